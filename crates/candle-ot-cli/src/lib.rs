//! The library behind the `candle-ot` command line: case evaluation (`eval`), point-cloud
//! readers (`distance`), barycenters (`barycenter`) and benchmarks (`bench`). The binary's contract is documented in the workspace README.

pub mod barycenter;
pub mod bench;
pub mod eval;
pub mod io;

/// A progress bar on stderr for the `tol` iterations of a Sinkhorn solve (`distance`,
/// `eval`): the schedule's steps, then the extra iterations against `max_iter` with the
/// current update error. indicatif draws nothing when stderr is not a terminal.
pub fn progress_observer(tol: f64, max_iter: usize) -> candle_ot::sinkhorn::Observer {
    use candle_ot::sinkhorn::{Observer, Phase};
    let bar = indicatif::ProgressBar::new(max_iter as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix("sinkhorn");
    Observer::new(move |p| {
        match p.phase {
            Phase::Schedule { step, steps } => {
                bar.set_message(format!("ε schedule {step}/{steps}"));
            }
            Phase::Tol {
                iteration,
                max_iter,
            } => {
                bar.set_length(max_iter as u64);
                bar.set_position(iteration as u64);
                if let Some(e) = p.update_error {
                    bar.set_message(format!("update error {e:.2e} (tol {tol:.1e})"));
                }
                if iteration >= max_iter || p.update_error.is_some_and(|e| e < tol) {
                    bar.finish_and_clear();
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    })
}
