//! Token choice and stop rules: what happens to the logits of one step, whoever ran the model.
//!
//! A sequence may own several rows (an ensemble: one row per prompt); its rows are adjacent in
//! the batch and vote by the mean of their log-probabilities. With one row the raw logits
//! choose, which is the same argmax and, for sampling, the same distribution.

use crate::eval::classify::argmax;
use crate::tokenizer::Tokenizer;
use crate::Result;
use rand::{Rng, SeedableRng};

/// How one sequence is decoded.
#[derive(Clone, Debug)]
pub struct DecodeParams {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); otherwise sample from `softmax(scores / temperature)`.
    pub temperature: f32,
    /// Stop as soon as the decoded text contains one of these (the text is cut before it).
    pub stop: Vec<String>,
    /// Seed of the sampler; `None`: seeded from the operating system.
    pub seed: Option<u64>,
    /// Nucleus sampling: draw only from the most likely tokens whose probabilities (after the
    /// temperature) add up to at least `top_p`; 1 keeps every token. Greedy ignores it.
    pub top_p: f32,
    /// How many of the most likely tokens to record at every step, with their
    /// log-probabilities under the model (before temperature): [`Sequence::top_logprobs`].
    pub top_logprobs: usize,
}

impl DecodeParams {
    /// Greedy decoding of at most `max_new_tokens`, no stop strings.
    pub fn greedy(max_new_tokens: usize) -> Self {
        DecodeParams { max_new_tokens, temperature: 0.0, stop: Vec::new(), seed: None, top_p: 1.0, top_logprobs: 0 }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It emitted one of the stop ids (the model's EOS).
    Eos,
    /// Its text contains a stop string.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
    /// The caller gave up on it.
    Cancelled,
}

impl Finish {
    /// The name the server reports (`finish_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// One sequence's decoding so far.
pub struct Sequence {
    /// New tokens, the stop id included when one ended it.
    pub tokens: Vec<u32>,
    /// Log-probability of each chosen token (mean over the sequence's rows); empty with
    /// [`DecodeStep::without_logprobs`].
    pub logprobs: Vec<f32>,
    /// Per new token, the `top_logprobs` most likely tokens of its step with their
    /// log-probabilities, most likely first (empty when `top_logprobs` is 0).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// `None` while it runs.
    pub finish: Option<Finish>,
    /// The decoded text cut before the stop string, when one ended it.
    pub stop_text: Option<String>,
    params: DecodeParams,
    picker: Picker,
}

impl Sequence {
    fn new(params: DecodeParams) -> Self {
        let picker = Picker::new(&params);
        Sequence {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            finish: (params.max_new_tokens == 0).then_some(Finish::Length),
            stop_text: None,
            params,
            picker,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The generated text: cut before the stop string that ended it, else all tokens decoded.
    pub fn text(&self, tokenizer: &Tokenizer) -> Result<String> {
        match &self.stop_text {
            Some(t) => Ok(t.clone()),
            None => tokenizer.decode(&self.tokens),
        }
    }
}

/// Told about every token as soon as it is chosen: the sequence's index and the sequence
/// (its new token last, `finish` set when it ended the sequence).
pub type TokenObserver<'t> = Box<dyn FnMut(usize, &Sequence) + Send + 't>;

/// The token choice and stop rules of a batch of sequences.
pub struct DecodeStep<'t> {
    pub sequences: Vec<Sequence>,
    /// Ids that end a sequence (the model's EOS ids; none to run to `max_new_tokens`).
    stop_ids: Vec<u32>,
    /// Decodes the tokens for stop strings.
    tokenizer: Option<&'t Tokenizer>,
    /// Whether [`Sequence::logprobs`] is filled (a pass over the vocabulary per row and step).
    logprobs: bool,
    /// See [`DecodeStep::on_token`].
    observer: Option<TokenObserver<'t>>,
}

impl<'t> DecodeStep<'t> {
    /// One sequence per `params`; a sequence asking for no tokens is finished at once. Stop
    /// strings need the `tokenizer`.
    pub fn new(
        params: impl IntoIterator<Item = DecodeParams>,
        stop_ids: Vec<u32>,
        tokenizer: Option<&'t Tokenizer>,
    ) -> Result<Self> {
        let sequences: Vec<Sequence> = params.into_iter().map(Sequence::new).collect();
        if tokenizer.is_none() && sequences.iter().any(|s| !s.params.stop.is_empty()) {
            crate::bail!("stop strings need a tokenizer to decode the generated tokens");
        }
        for (i, seq) in sequences.iter().enumerate() {
            let top_p = seq.params.top_p;
            if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
                crate::bail!("sequence {i}: top_p must be in (0, 1] (got {})", seq.params.top_p);
            }
        }
        Ok(DecodeStep { sequences, stop_ids, tokenizer, logprobs: true, observer: None })
    }

    /// Leaves [`Sequence::logprobs`] empty, for callers that only want the tokens.
    pub fn without_logprobs(mut self) -> Self {
        self.logprobs = false;
        self
    }

    /// Calls `observer` after every chosen token (streaming: the server sends each token to
    /// its client while the batch runs on).
    pub fn on_token(mut self, observer: TokenObserver<'t>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn all_finished(&self) -> bool {
        self.sequences.iter().all(Sequence::is_finished)
    }

    /// One step: `logits [R][V]` of the batch's rows, `owners[r]` the sequence of row `r`
    /// (a sequence's rows adjacent). Every running sequence gets a token and is finished on a
    /// stop id, a stop string, `max_new_tokens` or `cancelled(sequence)`, in that order.
    /// Returns per sequence the token chosen now (`None` for one finished before this step).
    pub fn step(
        &mut self,
        logits: &[Vec<f32>],
        owners: &[usize],
        cancelled: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<u32>>> {
        if logits.len() != owners.len() {
            crate::bail!("decoding step: {} rows of logits for {} rows", logits.len(), owners.len());
        }
        let mut chosen = vec![None; self.sequences.len()];
        let mut r = 0;
        while r < owners.len() {
            let i = owners[r];
            let mut end = r;
            while end < owners.len() && owners[end] == i {
                end += 1;
            }
            let Some(seq) = self.sequences.get_mut(i) else {
                crate::bail!("decoding step: row {r} belongs to sequence {i}, of {} sequences", chosen.len());
            };
            if seq.finish.is_none() {
                let rows: Vec<&[f32]> = logits[r..end].iter().map(Vec::as_slice).collect();
                let top_n = seq.params.top_logprobs;
                let choice = choose(&rows, &mut seq.picker, self.logprobs, top_n);
                chosen[i] = Some(choice.token);
                seq.tokens.push(choice.token);
                seq.logprobs.extend(choice.logprob);
                if top_n > 0 {
                    seq.top_logprobs.push(choice.top);
                }
                seq.finish = stop_rule(seq, &self.stop_ids, self.tokenizer)?;
                if seq.finish.is_none() && cancelled(i) {
                    seq.finish = Some(Finish::Cancelled);
                }
                if let Some(observe) = self.observer.as_mut() {
                    observe(i, seq);
                }
            }
            r = end;
        }
        Ok(chosen)
    }
}

/// Whether `seq`, its last token just chosen, ends now (cancellation aside).
fn stop_rule(seq: &mut Sequence, stop_ids: &[u32], tokenizer: Option<&Tokenizer>) -> Result<Option<Finish>> {
    let Some(&tok) = seq.tokens.last() else {
        return Ok(None);
    };
    if stop_ids.contains(&tok) {
        return Ok(Some(Finish::Eos));
    }
    if let (false, Some(tokenizer)) = (seq.params.stop.is_empty(), tokenizer) {
        let text = tokenizer.decode(&seq.tokens)?;
        let cut = seq.params.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
        if let Some(cut) = cut {
            seq.stop_text = Some(text[..cut].to_string());
            return Ok(Some(Finish::Stop));
        }
    }
    Ok((seq.tokens.len() >= seq.params.max_new_tokens).then_some(Finish::Length))
}

/// `log(sum(exp(row)))` in f64, the sums' precision.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln()
}

/// `log_softmax` of one row.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(row);
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// One step's choice for a sequence.
struct Choice {
    token: u32,
    /// Its (mean) log-probability, when asked for.
    logprob: Option<f32>,
    /// The `top_k` most likely tokens and their (mean) log-probabilities, most likely first.
    top: Vec<(u32, f32)>,
}

/// The `k` highest of `logprobs [V]` with their ids, highest first (ties: lower id first).
fn top_k(logprobs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
    let by_score = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    let k = k.min(ids.len());
    if k == 0 {
        return Vec::new();
    }
    // Partial selection first: a vocabulary is large and k small.
    ids.select_nth_unstable_by(k - 1, by_score);
    ids.truncate(k);
    ids.sort_by(by_score);
    ids.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

/// Picks the next token from a sequence's rows of logits `[V]` (one per prompt; several vote
/// by their mean log-probability); the chosen token's (mean) log-probability when `logprob`,
/// and the `top_k` most likely tokens.
fn choose(rows: &[&[f32]], picker: &mut Picker, logprob: bool, top_k_count: usize) -> Choice {
    let Some(first) = rows.first() else {
        return Choice { token: 0, logprob: None, top: Vec::new() };
    };
    if rows.len() == 1 && top_k_count == 0 {
        // One row: the logits choose; only the chosen token's log-probability is needed.
        let tok = picker.pick(first);
        let lp = first.get(tok).filter(|_| logprob).map(|&x| (x as f64 - log_sum_exp(first)) as f32);
        return Choice { token: tok as u32, logprob: lp, top: Vec::new() };
    }
    let mut mean = vec![0f32; first.len()];
    for r in rows {
        for (m, x) in mean.iter_mut().zip(log_softmax(r)) {
            *m += x / rows.len() as f32;
        }
    }
    let tok = picker.pick(&mean);
    Choice { token: tok as u32, logprob: mean.get(tok).copied(), top: top_k(&mean, top_k_count) }
}

/// How a sequence picks its next token from scores `[V]`.
enum Picker {
    Argmax,
    /// A draw from `softmax(scores / temperature)`, within the nucleus `top_p`.
    Sample { temperature: f32, top_p: f32, rng: Box<rand::rngs::StdRng> },
}

impl Picker {
    fn new(params: &DecodeParams) -> Self {
        if params.temperature <= 0.0 {
            return Picker::Argmax;
        }
        let rng = match params.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        Picker::Sample { temperature: params.temperature, top_p: params.top_p, rng: Box::new(rng) }
    }

    fn pick(&mut self, scores: &[f32]) -> usize {
        let Picker::Sample { temperature, top_p, rng } = self else {
            return argmax(scores);
        };
        let scaled: Vec<f32> = scores.iter().map(|s| s / *temperature).collect();
        let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut weights: Vec<f64> = scaled.iter().map(|&s| ((s - max) as f64).exp()).collect();
        if *top_p < 1.0 {
            nucleus(&mut weights, *top_p as f64);
        }
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        let mut pick = weights.len().saturating_sub(1);
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                pick = i;
                break;
            }
            u -= w;
        }
        pick
    }
}

/// Zeroes every weight outside the nucleus: the fewest most likely tokens whose share of
/// the total reaches `top_p` (ties at the edge: lower ids first).
fn nucleus(weights: &mut [f64], top_p: f64) {
    let total: f64 = weights.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut kept = 0.0;
    let mut keep = order.len();
    for (n, &i) in order.iter().enumerate() {
        kept += weights[i];
        if kept >= top_p * total {
            keep = n + 1;
            break;
        }
    }
    for &i in &order[keep..] {
        weights[i] = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_new_tokens: usize) -> DecodeParams {
        DecodeParams::greedy(max_new_tokens)
    }

    /// A row of logits `[V = 8]` peaked at `tok`.
    fn peak(tok: usize, height: f32) -> Vec<f32> {
        (0..8).map(|i| if i == tok { height } else { 0.0 }).collect()
    }

    fn never(_: usize) -> bool {
        false
    }

    #[test]
    fn greedy_stops_at_a_stop_id_or_the_length() {
        let mut d = DecodeStep::new([params(3), params(2)], vec![7], None).unwrap();
        let chosen = d.step(&[peak(7, 5.0), peak(3, 5.0)], &[0, 1], &never).unwrap();
        assert_eq!(chosen, vec![Some(7), Some(3)]);
        assert_eq!(d.sequences[0].finish, Some(Finish::Eos));
        assert_eq!(d.sequences[1].finish, None);
        // A finished sequence gets no token, even when its row is still in the batch.
        let chosen = d.step(&[peak(1, 5.0), peak(4, 5.0)], &[0, 1], &never).unwrap();
        assert_eq!(chosen, vec![None, Some(4)]);
        assert_eq!(d.sequences[1].finish, Some(Finish::Length));
        assert!(d.all_finished());
        assert_eq!(d.sequences[0].tokens, vec![7]);
        assert_eq!(d.sequences[0].logprobs.len(), 1);
        assert_eq!(d.sequences[1].tokens, vec![3, 4]);
        // Log-probability of the chosen token under `softmax(row)`.
        let row = peak(3, 5.0);
        let lse = (5f64.exp() + 7.0).ln();
        assert!((d.sequences[1].logprobs[0] as f64 - (row[3] as f64 - lse)).abs() < 1e-6);
    }

    #[test]
    fn log_probabilities_can_be_left_out() {
        let mut d = DecodeStep::new([params(1)], vec![], None).unwrap().without_logprobs();
        assert_eq!(d.step(&[peak(5, 1.0)], &[0], &never).unwrap(), vec![Some(5)]);
        assert!(d.sequences[0].logprobs.is_empty());
    }

    #[test]
    fn no_tokens_asked_is_finished_at_once() {
        let d = DecodeStep::new([params(0)], vec![], None).unwrap();
        assert!(d.all_finished());
        assert_eq!(d.sequences[0].finish, Some(Finish::Length));
    }

    #[test]
    fn an_ensemble_votes_by_mean_log_probability() {
        // Row 0 prefers 1 a little, row 1 prefers 2 strongly: the mean picks 2.
        let mut a = peak(1, 1.0);
        a[2] = 0.9;
        let b = peak(2, 6.0);
        let mut d = DecodeStep::new([params(4)], vec![], None).unwrap();
        let chosen = d.step(&[a.clone(), b.clone()], &[0, 0], &never).unwrap();
        assert_eq!(chosen, vec![Some(2)]);
        let mean = (log_softmax(&a)[2] + log_softmax(&b)[2]) / 2.0;
        assert!((d.sequences[0].logprobs[0] - mean).abs() < 1e-6);
    }

    #[test]
    fn cancellation_comes_after_the_other_rules() {
        let mut d = DecodeStep::new([params(1), params(5)], vec![], None).unwrap();
        d.step(&[peak(1, 1.0), peak(1, 1.0)], &[0, 1], &|_| true).unwrap();
        assert_eq!(d.sequences[0].finish, Some(Finish::Length));
        assert_eq!(d.sequences[1].finish, Some(Finish::Cancelled));
    }

    #[test]
    fn a_stop_string_cuts_the_text_before_it() {
        let json = crate::test_word_level::word_level_json(&[(0, "<eos>")], 8);
        let inner: tokenizers::Tokenizer = json.parse().unwrap();
        let tok = Tokenizer::new(inner, false, None, Some(0));
        let p = DecodeParams { stop: vec![String::new(), "w4".into()], ..params(10) };
        assert!(DecodeStep::new([p.clone()], vec![0], None).is_err(), "stop strings need a tokenizer");
        let mut d = DecodeStep::new([p], vec![0], Some(&tok)).unwrap();
        for t in [3, 5, 4, 6] {
            if d.all_finished() {
                break;
            }
            d.step(&[peak(t, 9.0)], &[0], &never).unwrap();
        }
        let seq = &d.sequences[0];
        assert_eq!(seq.finish, Some(Finish::Stop));
        assert_eq!(seq.tokens, vec![3, 5, 4]);
        let full = tok.decode(&seq.tokens).unwrap();
        let text = seq.text(&tok).unwrap();
        assert_eq!(text, full[..full.find("w4").unwrap()]);
    }

    #[test]
    fn sampling_is_reproducible_with_a_seed_and_follows_the_temperature() {
        let row: Vec<f32> = (0..8).map(|i| i as f32 * 0.3).collect();
        let draw = |seed: u64, temperature: f32| {
            let p = DecodeParams { temperature, seed: Some(seed), ..params(64) };
            let mut d = DecodeStep::new([p], vec![], None).unwrap();
            for _ in 0..64 {
                d.step(std::slice::from_ref(&row), &[0], &never).unwrap();
            }
            d.sequences.remove(0).tokens
        };
        assert_eq!(draw(11, 1.0), draw(11, 1.0));
        assert!(draw(11, 1.0).iter().collect::<std::collections::HashSet<_>>().len() > 1);
        // A very low temperature is argmax.
        assert!(draw(12, 1e-4).iter().all(|&t| t == 7));
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_under_the_model() {
        let row: Vec<f32> = vec![0.5, 3.0, -1.0, 2.0, 2.0, 0.0, 0.0, 1.0];
        let p = DecodeParams { top_logprobs: 3, ..params(1) };
        let mut d = DecodeStep::new([p], vec![], None).unwrap();
        d.step(std::slice::from_ref(&row), &[0], &never).unwrap();
        let seq = &d.sequences[0];
        let want = log_softmax(&row);
        // 1 first, then the tie 3 / 4 in id order.
        let ids: Vec<u32> = seq.top_logprobs[0].iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        for &(t, lp) in &seq.top_logprobs[0] {
            assert!((lp - want[t as usize]).abs() < 1e-6);
        }
        assert!((seq.logprobs[0] - want[1]).abs() < 1e-6);
    }

    #[test]
    fn nucleus_keeps_the_fewest_tokens_reaching_top_p() {
        let mut w = vec![0.1, 0.4, 0.2, 0.3];
        nucleus(&mut w, 0.65); // 0.4 + 0.3 = 0.7 >= 0.65
        assert_eq!(w, vec![0.0, 0.4, 0.0, 0.3]);
        let mut w = vec![0.1, 0.4, 0.2, 0.3];
        nucleus(&mut w, 1.0);
        assert_eq!(w, vec![0.1, 0.4, 0.2, 0.3]);
        // Sampling with a small top_p only ever draws the most likely token.
        let row: Vec<f32> = vec![1.0, 1.5, 0.2, 1.4];
        let p = DecodeParams { temperature: 1.0, top_p: 0.05, seed: Some(3), ..params(32) };
        let mut d = DecodeStep::new([p], vec![], None).unwrap();
        for _ in 0..32 {
            d.step(std::slice::from_ref(&row), &[0], &never).unwrap();
        }
        assert!(d.sequences[0].tokens.iter().all(|&t| t == 1));
        let bad = DecodeParams { top_p: 0.0, ..params(1) };
        assert!(DecodeStep::new([bad], vec![], None).is_err());
    }

    #[test]
    fn the_observer_sees_every_token_as_it_is_chosen() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let observer: TokenObserver = Box::new(move |i, seq| {
            log.lock().unwrap().push((i, *seq.tokens.last().unwrap(), seq.finish));
        });
        let mut d = DecodeStep::new([params(2), params(1)], vec![], None).unwrap().on_token(observer);
        d.step(&[peak(3, 5.0), peak(4, 5.0)], &[0, 1], &never).unwrap();
        d.step(&[peak(5, 5.0)], &[0], &never).unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, vec![(0, 3, None), (1, 4, Some(Finish::Length)), (0, 5, Some(Finish::Length))]);
    }
}
