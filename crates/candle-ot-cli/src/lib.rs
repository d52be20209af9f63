//! The library behind the `candle-ot` command line: case evaluation (`eval`), point-cloud
//! readers (`distance`), barycenters (`barycenter`) and benchmarks (`bench`). The binary's contract is documented in the workspace README.

pub mod barycenter;
pub mod bench;
pub mod eval;
pub mod io;
