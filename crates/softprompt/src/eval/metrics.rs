//! Classification and generation metrics.

/// Fraction of `predicted[i] == gold[i]`.
pub fn accuracy(predicted: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    let right = predicted.iter().zip(gold).filter(|(p, g)| p == g).count();
    right as f64 / gold.len() as f64
}

/// `matrix[gold][predicted]` counts.
pub fn confusion_matrix(predicted: &[usize], gold: &[usize], n_labels: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; n_labels]; n_labels];
    for (&p, &g) in predicted.iter().zip(gold) {
        if p < n_labels && g < n_labels {
            m[g][p] += 1;
        }
    }
    m
}

/// Unweighted mean over labels of F1 = 2PR / (P + R) (a label never predicted nor present
/// counts as F1 0 only if it occurs in `gold` or `predicted`; absent labels are skipped).
pub fn macro_f1(predicted: &[usize], gold: &[usize], n_labels: usize) -> f64 {
    let m = confusion_matrix(predicted, gold, n_labels);
    let mut sum = 0.0;
    let mut count = 0;
    for l in 0..n_labels {
        let tp = m[l][l] as f64;
        let gold_l: usize = m[l].iter().sum();
        let pred_l: usize = m.iter().map(|row| row[l]).sum();
        if gold_l == 0 && pred_l == 0 {
            continue;
        }
        count += 1;
        if tp > 0.0 {
            let p = tp / pred_l as f64;
            let r = tp / gold_l as f64;
            sum += 2.0 * p * r / (p + r);
        }
    }
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_punctuation() { ' ' } else { c })
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Normalised exact match.
pub fn exact_match(prediction: &str, gold: &str) -> bool {
    normalize_answer(prediction) == normalize_answer(gold)
}

/// Token-level F1 between normalised answers.
pub fn token_f1(prediction: &str, gold: &str) -> f64 {
    let p = normalize_answer(prediction);
    let g = normalize_answer(gold);
    let p: Vec<&str> = p.split_whitespace().collect();
    let g: Vec<&str> = g.split_whitespace().collect();
    if p.is_empty() || g.is_empty() {
        return f64::from(u8::from(p == g));
    }
    let mut remaining = g.clone();
    let mut common = 0usize;
    for w in &p {
        if let Some(i) = remaining.iter().position(|x| x == w) {
            remaining.swap_remove(i);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_by_hand() {
        let gold = [0, 0, 1, 1, 1];
        let pred = [0, 1, 1, 1, 0];
        assert!((accuracy(&pred, &gold) - 0.6).abs() < 1e-12);
        assert_eq!(confusion_matrix(&pred, &gold, 2), vec![vec![1, 1], vec![1, 2]]);
        // label 0: P=1/2 R=1/2 F1=0.5; label 1: P=2/3 R=2/3 F1=2/3
        assert!((macro_f1(&pred, &gold, 2) - (0.5 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!(exact_match("The  Paris!", "paris"));
        assert!((token_f1("the cat sat", "cat sat down") - 0.8).abs() < 1e-12);
    }
}
