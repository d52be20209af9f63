//! The library behind the `candle-ot` command line: case evaluation (`eval`) and point-cloud
//! readers (`distance`). The binary's contract is documented in the workspace README.

pub mod eval;
pub mod io;
