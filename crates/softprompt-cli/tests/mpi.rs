//! `mpirun -np 2 softprompt train` (feature `mpi`, Open MPI on loopback, one thread per rank)
//! on the llama-tiny fixture with the word-level tokenizer: the prompt equals the single
//! process's with the same global batch and seed, a resumed run continues exactly, and a
//! rank that fails or leaves ends the job with a clear error. Run by .ci/run:
//! `cargo test -p softprompt-cli --features mpi --test mpi`.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// `softprompt train` on the set-up's data: global batch 8 (16 examples of 3 to 5 tokens, so
/// the two shards of a batch would be padded differently if they were batched alone),
/// accumulation 2, dev evaluation and checkpoints every 2 steps, accuracy on the labels.
///
/// AdamW at 0.01: the ranks' gradient differs from one process's by float reassociation only
/// (about 1e-7 relative: one process sums the 8 rows inside its matmuls, two ranks sum two
/// halves), but Adam's normalisation `m / sqrt(v)` turns a relative error of a component whose
/// gradient nearly cancels into an absolute error of the update times the learning rate; at
/// 0.05 one of the 128 prompt values differs by 7e-6 after 4 steps (Adafactor, which divides
/// by factored second moments with eps 1e-30, by 7e-6 at 0.05 and 0.3), at 0.01 by 1.2e-7.
fn train_args(s: &Setup, out: &Path, steps: usize) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--model"].map(String::from).to_vec();
    args.push(s.model.display().to_string());
    for (flag, value) in [
        ("--data", s.train.display().to_string()),
        ("--dev", s.dev.display().to_string()),
        ("--output", out.display().to_string()),
        ("--steps", steps.to_string()),
        ("--batch-size", "8".into()),
        ("--grad-accum", "2".into()),
        ("--n-tokens", "4".into()),
        ("--labels", "w100,w200".into()),
        ("--select-by", "accuracy".into()),
        ("--eval-every", "2".into()),
        ("--checkpoint-every", "2".into()),
        ("--seed", "3".into()),
        ("--optimizer", "adamw".into()),
        ("--lr", "0.01".into()),
        ("--collective-timeout", "60".into()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    args.push("--quiet".into());
    args
}

/// One thread per process, as the ranks have.
fn one_thread(c: &mut Command) -> &mut Command {
    c.env("RAYON_NUM_THREADS", "1")
}

/// `mpirun -np 2` of `program args` on this machine (as root too, as CI runs).
fn mpirun(program: &str, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(program)
        .args(args);
    one_thread(&mut c);
    c
}

fn softprompt_path() -> String {
    env!("CARGO_BIN_EXE_softprompt").to_string()
}

/// The trained prompt of an output folder, `[N * D]`.
fn prompt(out: &Path) -> Vec<f32> {
    let adapter =
        softprompt::PeftAdapter::load(out, &candle_core::Device::Cpu).expect("load the adapter");
    adapter
        .prompt
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn metrics(out: &Path) -> Vec<softprompt::train::metrics::StepMetrics> {
    softprompt::train::metrics::read(&out.join("metrics.jsonl")).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn two_ranks_train_the_single_process_prompt_and_resume_exactly() {
    let s = setup(16);
    let single = s.root.join("single");
    let (ok, _, stderr) = run(one_thread(
        bin()
            .args(train_args(&s, &single, 4))
            .args(["--parallel", "none"]),
    ));
    assert!(ok, "single-process run failed: {stderr}");

    let two = s.root.join("two");
    let (ok, stdout, stderr) = run(&mut mpirun(&softprompt_path(), &train_args(&s, &two, 4)));
    assert!(ok, "mpirun -np 2 failed:\n{stdout}\n{stderr}");
    // Rank 0 alone reports.
    assert_eq!(stdout.matches("trained 4 steps").count(), 1, "{stdout}");

    let (p1, p2) = (prompt(&single), prompt(&two));
    let diff = max_diff(&p1, &p2);
    assert!(diff < 1e-6, "2 ranks vs 1 process: prompts differ by {diff}");
    // One metrics line per step, written once, with the same losses and dev scores.
    let (m1, m2) = (metrics(&single), metrics(&two));
    assert_eq!(m2.len(), 4);
    assert_ne!(m1[1].dev_loss, m1[3].dev_loss, "the prompt did not train");
    for (a, b) in m1.iter().zip(&m2) {
        assert_eq!(a.step, b.step);
        // Relative: the losses and norms are about 5-10.
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-5 * x.abs().max(1.0);
        assert!(close(a.loss, b.loss), "{a:?} vs {b:?}");
        assert!(close(a.grad_norm, b.grad_norm), "{a:?} vs {b:?}");
        assert_eq!(a.dev_accuracy, b.dev_accuracy);
        match (a.dev_loss, b.dev_loss) {
            (Some(x), Some(y)) => assert!(close(x, y), "{x} vs {y}"),
            (x, y) => assert_eq!(x, y),
        }
        assert!(b.comm_s.is_some_and(|c| c >= 0.0) && a.comm_s.is_none());
    }

    // Stopped after 2 steps, resumed under MPI to 4: the uninterrupted run's bits.
    let resumed = s.root.join("resumed");
    let (ok, _, stderr) = run(&mut mpirun(&softprompt_path(), &train_args(&s, &resumed, 2)));
    assert!(ok, "first half failed: {stderr}");
    let mut args = train_args(&s, &resumed, 4);
    args.push("--resume".into());
    let (ok, stdout, stderr) = run(&mut mpirun(&softprompt_path(), &args));
    assert!(ok, "resume failed: {stderr}");
    assert!(stdout.contains("resumed at step 2"), "{stdout}");
    let p3 = prompt(&resumed);
    assert_eq!(max_diff(&p2, &p3), 0.0, "the resumed run differs");
    assert_eq!(metrics(&resumed).len(), 4);
}

/// A rank whose data differs from rank 0's stops the job at once with an error naming it; a
/// rank that leaves early makes the other's collective time out and abort the job.
#[test]
fn a_failing_or_missing_rank_ends_the_job_with_an_error() {
    let s = setup(16);
    let other = s.root.join("other.jsonl");
    write_data(&other, 16, 1);
    // Rank 1 reads other data.
    let out = s.root.join("mismatch");
    let mut rank1 = train_args(&s, &out, 4);
    let data = rank1.iter().position(|a| a == "--data").unwrap();
    rank1[data + 1] = other.display().to_string();
    let script = format!(
        "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec {bin} {r1}; else exec {bin} {r0}; fi",
        bin = softprompt_path(),
        r1 = rank1.join(" "),
        r0 = train_args(&s, &out, 4).join(" "),
    );
    let started = std::time::Instant::now();
    let (ok, _, stderr) = run(&mut mpirun("sh", &["-c".into(), script]));
    assert!(!ok);
    assert!(
        stderr.contains("rank 1 of 2") && stderr.contains("differs from rank 0's"),
        "{stderr}"
    );
    assert!(started.elapsed().as_secs() < 50, "the job did not end at once");

    // Rank 1 stops after 2 steps; rank 0 waits for it at step 3 until the timeout.
    let out = s.root.join("missing");
    let mut rank0 = train_args(&s, &out, 4);
    let timeout = rank0.iter().position(|a| a == "--collective-timeout").unwrap();
    rank0[timeout + 1] = "3".into();
    let mut rank1 = rank0.clone();
    let steps = rank1.iter().position(|a| a == "--steps").unwrap();
    rank1[steps + 1] = "2".into();
    let script = format!(
        "if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then exec {bin} {r1}; else exec {bin} {r0}; fi",
        bin = softprompt_path(),
        r1 = rank1.join(" "),
        r0 = rank0.join(" "),
    );
    let (ok, _, stderr) = run(&mut mpirun("sh", &["-c".into(), script]));
    assert!(!ok);
    assert!(
        stderr.contains("rank 0 of 2") && stderr.contains("a rank failed or hangs"),
        "{stderr}"
    );
}

/// Model tuning (every weight trained, the gradients reduced in buckets) on 2 ranks ends with
/// the single process's weights, and rank 0 alone writes the model folder.
#[test]
fn two_ranks_model_tune_as_one_process() {
    let s = setup(16);
    let args = |out: &Path| -> Vec<String> {
        let mut a = train_args(&s, out, 2);
        // No prompt, no dev selection: drop the prompt-only flags.
        for flag in ["--n-tokens", "--labels", "--select-by"] {
            let i = a.iter().position(|x| x == flag).unwrap();
            a.drain(i..i + 2);
        }
        a.extend(["--method", "model-tuning"].map(String::from));
        // Every weight is trained by AdamW: at 0.01 two of llama-tiny's 26,784 values (nearly
        // cancelling gradients, see `train_args`) differ by 4e-6 after 2 steps; at 0.001,
        // by 4e-7 at most, while the weights move by 2e-3.
        let lr = a.iter().position(|x| x == "--lr").unwrap();
        a[lr + 1] = "0.001".into();
        a
    };
    let single = s.root.join("mt-single");
    let (ok, _, stderr) = run(one_thread(bin().args(args(&single)).args(["--parallel", "none"])));
    assert!(ok, "single-process model tuning failed: {stderr}");
    let two = s.root.join("mt-two");
    let (ok, stdout, stderr) = run(&mut mpirun(&softprompt_path(), &args(&two)));
    assert!(ok, "mpirun model tuning failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.matches("tuned model folder written").count(), 1, "{stdout}");

    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let base = load(&s.model);
    let (w1, w2) = (load(&single), load(&two));
    assert_eq!(w1.len(), w2.len());
    let mut moved = 0.0f32;
    for (name, a) in &w1 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = w2[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-6, "{name}: 2 ranks vs 1 process differ by {diff}");
        let before = base[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        moved = moved.max(max_diff(&a, &before));
    }
    assert!(moved > 1e-4, "model tuning did not change the weights");
}
