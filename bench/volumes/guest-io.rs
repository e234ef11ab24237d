//! The measuring program run inside a microVM by bench/volumes/run.sh (built static,
//! with no dependencies, and copied into a busybox image): the same three figures as
//! crates/agent/examples/bench-volumes.rs, for one directory.
//!
//! Usage: guest-io DIR SIZE_MB FSYNCS
//! Prints: `write_mbps read_mbps fsync_p50_us fsync_p99_us cold|warm`

use std::io::{Read, Write};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("/data"));
    let size_mb: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(128);
    let fsyncs: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(500);
    if let Err(e) = run(&dir, size_mb, fsyncs) {
        eprintln!("guest-io: {}: {e}", dir.display());
        std::process::exit(1);
    }
}

fn run(dir: &std::path::Path, size_mb: usize, fsyncs: usize) -> std::io::Result<()> {
    let path = dir.join("bench.dat");
    let chunk = vec![0x5au8; 1 << 20];
    let began = Instant::now();
    let mut file = std::fs::File::create(&path)?;
    for _ in 0..size_mb {
        file.write_all(&chunk)?;
    }
    file.sync_data()?;
    let write_mbps = size_mb as f64 / began.elapsed().as_secs_f64();
    drop(file);
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
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
    println!(
        "{:.1} {:.1} {:.0} {:.0} {}",
        write_mbps,
        read_mbps,
        at(0.50).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        if cold { "cold" } else { "warm" }
    );
    Ok(())
}
