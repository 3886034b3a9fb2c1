//! Whole-system benchmarks behind `weft-bench`: each compares Weft with baselines measured in
//! the same run, interleaved, and reports medians.

pub mod capture;
pub mod client;
pub mod enroll;
pub mod load;
pub mod policy;
mod policy_rr;
pub mod stunnel;
pub mod tunnel;

/// How much each lane measures, shared by the benchmarks.
#[derive(Clone, Debug, clap::Args)]
pub struct Measure {
    /// Rounds; each measures every lane once, in turn.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Bytes of the bulk download per measurement.
    #[arg(long, default_value_t = 512 << 20)]
    pub bytes: u64,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 5000)]
    pub round_trips: usize,
    /// Size of each request and response, bytes.
    #[arg(long, default_value_t = 64)]
    pub message: usize,
}

/// CPU time of every thread of process `pid` so far, nanoseconds (`schedstat`); 0 for a
/// process gone. Live threads only, at nanosecond resolution: for processes whose threads
/// outlive the measurement (Weft's tunnel); see [`process_cpu_ns`] for the others.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU time of process `pid` so far, nanoseconds: user and system time of all its threads,
/// including threads that have exited (stunnel serves each connection on a thread of its own,
/// gone by the time the connection's figures are read, so summing the live threads'
/// `schedstat` missed it). From `/proc/PID/stat`, in clock ticks (10 ms): the measured spans
/// are a second or more. 0 for a process gone.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces), from field 3 (state): utime is
    // field 14 and stime field 15.
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as u64;
    ticks * (1_000_000_000 / per_second)
}

/// A figure rounded to two decimals for the JSON line.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Median of a list of figures (upper median for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `q` quantile (0..=1) of a list of figures.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.5), 3.0);
        assert_eq!(
            quantile(&(1..=100).map(f64::from).collect::<Vec<_>>(), 0.99),
            99.0
        );
    }
}
