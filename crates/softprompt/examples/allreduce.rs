//! The deterministic gradient all-reduce of data-parallel training alone, timed: for each
//! buffer size, `ITERS` reductions after a barrier (so waiting for a slower rank is not
//! counted), the median and best time per reduction on rank 0. Sizes: SmolLM2's prompt
//! gradient at 20 and 100 tokens, and 1, 4 and 16 MiB buckets of model tuning.
//!
//!   cargo build -p softprompt --features mpi --example allreduce
//!   RAYON_NUM_THREADS=1 mpirun -np 2 target/debug/examples/allreduce [ITERS]

use std::time::{Duration, Instant};

fn main() -> softprompt::Result<()> {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let mpi = softprompt::train::mpi::init()?;
    let par = mpi.parallel(Duration::from_secs(120));
    let sizes = [
        ("prompt 20 x 576", 20 * 576),
        ("prompt 100 x 576", 100 * 576),
        ("1 MiB", 1 << 18),
        ("4 MiB", 1 << 20),
        ("16 MiB (a bucket)", 1 << 22),
    ];
    if par.is_root() {
        println!("ranks {}; {iters} all-reduces per size after a barrier each", par.size());
        println!("| buffer | floats | median ms | best ms | GB/s sent per rank (best) |");
        println!("|---|---:|---:|---:|---:|");
    }
    for (name, n) in sizes {
        let mut buf = vec![par.rank() as f32 + 0.5; n];
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            par.barrier("barrier")?;
            let started = Instant::now();
            par.all_reduce_sum_f32("all-reduce", &mut buf)?;
            times.push(started.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let (median, best) = (times[times.len() / 2], times[0]);
        // Each rank sends (R-1)/R of the buffer twice (all-to-all, all-gather).
        let r = par.size() as f64;
        let sent = 2.0 * (r - 1.0) / r * (n * 4) as f64;
        if par.is_root() {
            println!(
                "| {name} | {n} | {:.3} | {:.3} | {:.2} |",
                median * 1e3,
                best * 1e3,
                sent / best / 1e9
            );
        }
    }
    Ok(())
}
