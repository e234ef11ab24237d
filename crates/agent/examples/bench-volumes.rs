//! Volume I/O against the host's own filesystem, in one run (bench/volumes/run.sh).
//!
//! Through the agent's own volume code (`aloft_agent::volumes`: a sparse ext4 image on a
//! loop device, bind-mount source as a container gets it), for a plain and an encrypted
//! volume, next to a directory of the filesystem the images live on:
//! - sequential write of SIZE_MB in 1 MiB writes, then fdatasync (MB/s);
//! - sequential read of that file after dropping the page cache (MB/s);
//! - fsync latency: FSYNCS times a 4 KiB write at the file's end then fdatasync (p50, p99).
//!
//! Usage: bench-volumes BASE_DIR [SIZE_MB] [FSYNCS] [ROUNDS]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aloft_agent::volumes::Volumes;
use aloft_api::internal::MachineSpec;

struct Figures {
    write_mbps: f64,
    read_mbps: f64,
    fsync_p50: Duration,
    fsync_p99: Duration,
}

fn drop_caches() -> bool {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn measure(dir: &Path, size_mb: usize, fsyncs: usize) -> std::io::Result<Figures> {
    let path = dir.join("bench.dat");
    let _ = std::fs::remove_file(&path);
    let chunk = vec![0x5au8; 1 << 20];
    let began = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    for _ in 0..size_mb {
        file.write_all(&chunk)?;
    }
    file.sync_data()?;
    let write_mbps = size_mb as f64 / began.elapsed().as_secs_f64();
    drop(file);

    drop_caches();
    let began = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut read = 0usize;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let read_mbps = (read >> 20) as f64 / began.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;

    let log = dir.join("fsync.dat");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)?;
    let record = vec![0xa5u8; 4096];
    let mut times = Vec::with_capacity(fsyncs);
    for _ in 0..fsyncs {
        let began = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        times.push(began.elapsed());
    }
    drop(file);
    std::fs::remove_file(&log)?;
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok(Figures {
        write_mbps,
        read_mbps,
        fsync_p50: at(0.50),
        fsync_p99: at(0.99),
    })
}

fn spec(volume: &str) -> MachineSpec {
    MachineSpec {
        id: "bench".into(),
        config: aloft_api::MachineConfig {
            mounts: vec![aloft_api::MachineMount {
                volume: volume.into(),
                path: "/data".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        ..Default::default()
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let base = PathBuf::from(
        args.get(1)
            .map(String::as_str)
            .unwrap_or("/var/tmp/aloft-bench-volumes"),
    );
    let size_mb: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(512);
    let fsyncs: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rounds: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(3);
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(base.join("direct"))?;
    let volumes = Volumes::new(&base.join("volumes")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut key = vec![0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    volumes
        .create("vol_benchplain", 2, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    volumes
        .create("vol_benchsecret", 2, Some(&key))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let keys = HashMap::from([("vol_benchsecret".to_string(), key)]);
    let plain = volumes
        .mounts_for(&spec("vol_benchplain"), &keys)
        .map_err(|e| anyhow::anyhow!("{e}"))?[0]
        .source
        .clone();
    let secret = volumes
        .mounts_for(&spec("vol_benchsecret"), &keys)
        .map_err(|e| anyhow::anyhow!("{e}"))?[0]
        .source
        .clone();
    let cold = drop_caches();
    println!(
        "bench/volumes: {size_mb} MB sequential, {fsyncs} x 4 KiB fdatasync, best of {rounds} rounds (reads {})",
        if cold {
            "after dropping the page cache"
        } else {
            "possibly cached: drop_caches refused"
        }
    );
    let targets = [
        ("host filesystem", base.join("direct")),
        ("volume", plain),
        ("volume, encrypted", secret),
    ];
    let mut best: Vec<Option<Figures>> = targets.iter().map(|_| None).collect();
    // Interleaved, so load from elsewhere on the host falls on all of them alike.
    for _ in 0..rounds {
        for (i, (_, dir)) in targets.iter().enumerate() {
            let f = measure(dir, size_mb, fsyncs)?;
            best[i] = Some(match best[i].take() {
                None => f,
                Some(b) => Figures {
                    write_mbps: b.write_mbps.max(f.write_mbps),
                    read_mbps: b.read_mbps.max(f.read_mbps),
                    fsync_p50: b.fsync_p50.min(f.fsync_p50),
                    fsync_p99: b.fsync_p99.min(f.fsync_p99),
                },
            });
        }
    }
    let direct = best[0]
        .as_ref()
        .map(|f| (f.write_mbps, f.read_mbps, f.fsync_p99))
        .unwrap_or((1.0, 1.0, Duration::from_micros(1)));
    println!(
        "{:<20} {:>10} {:>10} {:>11} {:>11} {:>8} {:>8} {:>9}",
        "target", "write MB/s", "read MB/s", "fsync p50", "fsync p99", "write x", "read x", "p99 x"
    );
    for ((name, _), figures) in targets.iter().zip(&best) {
        let Some(f) = figures else { continue };
        println!(
            "{:<20} {:>10.0} {:>10.0} {:>9.0}us {:>9.0}us {:>8.2} {:>8.2} {:>9.2}",
            name,
            f.write_mbps,
            f.read_mbps,
            f.fsync_p50.as_secs_f64() * 1e6,
            f.fsync_p99.as_secs_f64() * 1e6,
            f.write_mbps / direct.0,
            f.read_mbps / direct.1,
            f.fsync_p99.as_secs_f64() / direct.2.as_secs_f64(),
        );
    }
    volumes.release_all();
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
