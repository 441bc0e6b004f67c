//! Pinning threads to CPUs: the HSM workers when the configuration asks for it
//! ([`crate::HsmConfig::with_worker_cpus`]), and the benchmark's threads.
//!
//! A worker left to float moves between cores when the async runtime's threads wake up beside
//! it, and each move costs it its warm caches. On a software HSM, whose every signature is CPU
//! work, that shows as a few percent of throughput and as noise between runs.

use std::io;

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// The CPUs the calling thread may run on, in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect())
}

/// Restricts the calling thread (and threads it starts later) to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= CpuSet::MAX_CPU {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "CPU {cpu} is beyond the largest CPU number ({})",
                CpuSet::MAX_CPU - 1
            ),
        ));
    }
    let mut set = CpuSet::new();
    set.set(cpu);
    Ok(sched_setaffinity(None, &set)?)
}

/// CPU numbers as ranges, the way `/proc/*/status` lists them: `0-3,8`.
pub fn describe(cpus: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &cpu in cpus {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == cpu => *end = cpu,
            _ => ranges.push((cpu, cpu)),
        }
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|&(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect();
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn cpus_are_described_as_ranges() {
        assert_eq!(describe(&[]), "");
        assert_eq!(describe(&[3]), "3");
        assert_eq!(describe(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }
}
