//! What the row benchmarks of envelope-sqlx and envelope-diesel share: the rows, the order of
//! the sides per round, the samples, and the report.

/// Rows per multi-row `INSERT`.
pub const BATCH: usize = 1_000;

/// `(rows, rounds)`: 100,000 rows and 11 rounds, or 20,000 and 3 with `--quick`.
pub fn size() -> (usize, usize) {
    if std::env::args().any(|a| a == "--quick") {
        (20_000, 3)
    } else {
        (100_000, 11)
    }
}

/// The 64-byte values: the row number, zero-padded.
pub fn values(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{i:064}").into_bytes()).collect()
}

/// The order in which the `sides` run in round `round`: reversed every other round, so no side
/// always runs on a colder or warmer server.
pub fn order(sides: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sides).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// One side's times, in seconds, one entry per round.
#[derive(Debug, Default)]
pub struct Samples {
    insert: Vec<f64>,
    select: Vec<f64>,
    total: Vec<f64>,
}

impl Samples {
    /// Record one round.
    pub fn push(&mut self, insert: f64, select: f64) {
        self.insert.push(insert);
        self.select.push(select);
        self.total.push(insert + select);
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Print per-row medians for each side and the median per-round ratio of its total to the
/// first side's (the baseline's) total in the same round.
pub fn report(title: &str, n: usize, sides: &[(&str, &Samples)]) {
    println!("{title}");
    println!(
        "{:>24} {:>11} {:>11} {:>11} {:>10}",
        "", "insert", "select", "total", "ratio"
    );
    let us = |v: &[f64]| median(v) * 1e6 / n as f64;
    let Some((_, base)) = sides.first() else {
        return;
    };
    for (name, s) in sides {
        let ratios: Vec<f64> = s
            .total
            .iter()
            .zip(&base.total)
            .map(|(a, b)| a / b)
            .collect();
        println!(
            "{name:>24} {:>8.3} µs {:>8.3} µs {:>8.3} µs {:>9.3}x",
            us(&s.insert),
            us(&s.select),
            us(&s.total),
            median(&ratios)
        );
    }
    println!(
        "(µs per row, medians; ratio = median per-round total / {} total)",
        sides[0].0
    );
}
