//! Crash safety of `softprompt train`: a run SIGKILLed at random points and resumed each time
//! with `--resume` must end with the very adapter of an uninterrupted run (bit for bit), and
//! no file of the output folder may ever be seen truncated or half written.
//!
//! Model: the llama-tiny fixture with a word-level tokenizer (as in `train_cli.rs`). The kill
//! points are drawn from a seeded generator, as fractions of the uninterrupted run's wall
//! time, so they land in start-up, in steps, in evaluations and in checkpoint writes.
//! Runs in about 15 s.

mod common;

use common::{setup, train_on, Setup};
use softprompt::prompt::PeftAdapter;
use softprompt::train::checkpoint::Checkpoint;
use softprompt::train::metrics;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Training steps of each run (a checkpoint after every one).
const STEPS: usize = 120;
/// Kills (and resumes) of the interrupted runs (`SOFTPROMPT_CRASH_KILLS` overrides it).
const KILLS: usize = 8;
/// Seed of the kill points (`SOFTPROMPT_CRASH_SEED` overrides it).
const SEED: u64 = 0x5eed_c0de;

/// `softprompt train --resume` with a checkpoint after every step and AdamW (its state
/// tensors make the checkpoint bigger than the prompt alone).
fn train_cmd(s: &Setup, out: &Path) -> Command {
    let mut c = train_on(s);
    c.args(["--labels", "w100,w200", "--n-tokens", "4", "--batch-size", "4"])
        .args(["--optimizer", "adamw", "--lr", "0.05", "--eval-every", "3"])
        .args(["--checkpoint-every", "1", "--steps", &STEPS.to_string()])
        .args(["--resume", "--quiet"])
        .arg("--output")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// splitmix64: the seeded kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every output file present must parse completely. Returns the checkpoint's step (0 when
/// there is no checkpoint yet).
fn check_outputs(out: &Path, what: &str) -> usize {
    let device = candle_core::Device::Cpu;
    let step = match Checkpoint::load(out, &device) {
        Ok(Some(c)) => {
            assert_eq!(c.prompt.dims(), [4, 32], "{what}: checkpoint prompt shape");
            c.step
        }
        Ok(None) => 0,
        Err(e) => panic!("{what}: the checkpoint does not parse: {e}"),
    };
    let rows = metrics::read(&out.join(metrics::FILE))
        .unwrap_or_else(|e| panic!("{what}: metrics.jsonl does not parse: {e}"));
    for (i, r) in rows.iter().enumerate() {
        // Steps logged after the checkpoint are dropped and logged again by the resumed run.
        assert_eq!(r.step, i + 1, "{what}: metrics.jsonl steps {rows:?}");
    }
    let config = out.join(softprompt::prompt::peft::CONFIG_FILE);
    let weights = out.join(softprompt::prompt::peft::WEIGHTS_FILE);
    if config.exists() || weights.exists() {
        // Both are written at the end, each atomically: a kill between them leaves one.
        if config.exists() && weights.exists() {
            PeftAdapter::load(out, &device)
                .unwrap_or_else(|e| panic!("{what}: the adapter does not parse: {e}"));
        }
    }
    let task = out.join("task.json");
    if task.exists() {
        let text = std::fs::read_to_string(&task).unwrap();
        serde_json::from_str::<serde_json::Value>(&text)
            .unwrap_or_else(|e| panic!("{what}: task.json does not parse: {e}"));
    }
    let svg = out.join("loss.svg");
    if svg.exists() {
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.trim_end().ends_with("</svg>"), "{what}: loss.svg is truncated");
    }
    step
}

/// (step, loss, lr, grad_norm, dev_loss) of every metrics line: everything but the speed.
fn trajectory(out: &Path) -> Vec<(usize, u64, u64, u64, Option<u64>)> {
    metrics::read(&out.join(metrics::FILE))
        .unwrap()
        .iter()
        .map(|m| {
            (
                m.step,
                m.loss.to_bits(),
                m.lr.to_bits(),
                m.grad_norm.to_bits(),
                m.dev_loss.map(f64::to_bits),
            )
        })
        .collect()
}

/// `name` from the environment (to run the test longer by hand), else `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resumes (and kills) the run in `run` until it has finished; returns the checkpoint step
/// after each kill.
fn run_with_kills(s: &Setup, run: &Path, full: Duration, rng: &mut Rng, max_kills: usize) -> Vec<usize> {
    let mut steps_at_kill = Vec::new();
    loop {
        let killing = steps_at_kill.len() < max_kills;
        // Each resume runs for 2% to 22% of the uninterrupted run's time, so the kills
        // spread over the whole run and some land during start-up.
        let at = full.mul_f64(0.02 + 0.2 * rng.unit());
        let mut child = train_cmd(s, run).spawn().unwrap();
        let deadline = Instant::now() + at;
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if killing && Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match finished {
            Some(status) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    e.read_to_string(&mut err).unwrap();
                }
                assert!(status.success(), "resumed run failed: {err}");
                assert_eq!(check_outputs(run, "finished run"), STEPS);
                return steps_at_kill;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                let what = format!("after kill {} at {at:?}", steps_at_kill.len() + 1);
                steps_at_kill.push(check_outputs(run, &what));
            }
        }
    }
}

#[test]
fn killed_and_resumed_run_equals_the_uninterrupted_one() {
    let s = setup(20);
    let kills_wanted = env_or("SOFTPROMPT_CRASH_KILLS", KILLS as u64) as usize;
    let mut rng = Rng(env_or("SOFTPROMPT_CRASH_SEED", SEED));

    // The uninterrupted run, timed: kill points are fractions of its duration.
    let reference = s.root.join("reference");
    let started = Instant::now();
    let out = train_cmd(&s, &reference).output().unwrap();
    let full = started.elapsed();
    assert!(
        out.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(check_outputs(&reference, "reference"), STEPS);
    let reference_content = checkpoint_content(&reference);
    let reference_trajectory = trajectory(&reference);

    // Rounds: a fresh output folder, killed and resumed until it finishes, then compared.
    let mut kills = 0;
    let mut mid_training = 0;
    let mut leftovers = 0;
    let mut round = 0;
    while kills < kills_wanted {
        round += 1;
        assert!(round <= 4 * kills_wanted, "the kills keep missing the runs");
        let run = s.root.join(format!("killed-{round}"));
        let steps = run_with_kills(&s, &run, full, &mut rng, kills_wanted - kills);
        eprintln!("round {round}: checkpoint step after each kill: {steps:?}");
        kills += steps.len();
        mid_training += steps.iter().filter(|&&s| s > 0 && s < STEPS).count();

        // Bit for bit: the adapter files, the last checkpoint's content, and the logged
        // trajectory. (The checkpoint file's bytes may differ: safetensors writes its
        // metadata map in hash order, which changes between processes.)
        for f in [
            softprompt::prompt::peft::WEIGHTS_FILE,
            softprompt::prompt::peft::CONFIG_FILE,
        ] {
            let a = std::fs::read(reference.join(f)).unwrap();
            let b = std::fs::read(run.join(f)).unwrap();
            assert!(a == b, "round {round}: {f} differs from the uninterrupted run's");
        }
        assert_eq!(checkpoint_content(&run), reference_content, "round {round}");
        assert_eq!(trajectory(&run), reference_trajectory, "round {round}");

        // Temporary files of atomic writes cut short by a kill stay behind (hidden, harmless).
        leftovers += walk(&run)
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".tmp.")))
            .count();
        std::fs::remove_dir_all(&run).unwrap();
    }
    eprintln!(
        "{kills} kills survived in {round} rounds ({mid_training} mid-training), nothing lost; \
         uninterrupted run {full:?}; {leftovers} temporary files of interrupted writes left behind"
    );
    assert!(mid_training > 0, "no kill landed mid-training");
}

/// Everything a checkpoint holds, floats as bits.
fn checkpoint_content(out: &Path) -> String {
    let c = Checkpoint::load(out, &candle_core::Device::Cpu).unwrap().unwrap();
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    let mut tensors: Vec<(String, Vec<u32>)> =
        c.optimizer.tensors.iter().map(|(k, t)| (k.clone(), bits(t))).collect();
    tensors.sort();
    let mut scalars: Vec<(String, u64)> =
        c.optimizer.scalars.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect();
    scalars.sort();
    let best = c.best.as_ref().map(|b| (b.dev_loss.to_bits(), b.step, bits(&b.prompt)));
    format!(
        "step {} epoch {} position {} evals_since_best {} stopped_early {} hash {} prompt {:?} \
         best {best:?} optimizer {tensors:?} {scalars:?}",
        c.step,
        c.epoch,
        c.position,
        c.evals_since_best,
        c.stopped_early,
        c.config_hash,
        bits(&c.prompt)
    )
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
