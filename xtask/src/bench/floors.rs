//! The physical floors, measured in the same run as what they bound: memory copy bandwidth over guest-sized
//! buffers, and stream bandwidth over the transports the migrator uses (a unix socket, TCP over a veth pair
//! between two namespaces).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    time::Instant,
};

use anyhow::{Context, Result};

use super::{
    Ctx,
    net::{self, VethPair},
    report::{Better, Results},
};

pub const GROUP: &str = "floors";
pub const MEMCPY: &str = "memcpy bandwidth";
pub const UNIX: &str = "unix socket bandwidth";
pub const TCP_VETH: &str = "TCP over veth bandwidth";

const MIB: f64 = 1024.0 * 1024.0;
const CHUNK: usize = 1 << 20;

pub fn run(ctx: &Ctx, results: &mut Results) -> Result<()> {
    let buf_bytes = if ctx.quick { 32 << 20 } else { 256 << 20 };
    let stream_bytes: u64 = if ctx.quick { 64 << 20 } else { 1 << 30 };
    for name in [MEMCPY, UNIX, TCP_VETH] {
        results.declare(GROUP, name, "MiB/s", Better::Higher);
    }
    results.note(
        GROUP,
        MEMCPY,
        &format!("one copy of a {} MiB buffer per run", buf_bytes >> 20),
    );
    ctx.progress(&format!("floors: memcpy of {} MiB", buf_bytes >> 20));
    let src = vec![0x5au8; buf_bytes];
    let mut dst = vec![0u8; buf_bytes];
    dst.copy_from_slice(&src); // warm: fault every page in
    for _ in 0..ctx.runs {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        results.push(
            GROUP,
            MEMCPY,
            "MiB/s",
            Better::Higher,
            buf_bytes as f64 / MIB / t.elapsed().as_secs_f64(),
        );
    }
    drop((src, dst));

    ctx.progress(&format!(
        "floors: unix socket, {} MiB per run",
        stream_bytes >> 20
    ));
    results.note(
        GROUP,
        UNIX,
        &format!("{} MiB in 1 MiB writes per run", stream_bytes >> 20),
    );
    for _ in 0..ctx.runs {
        let (a, b) = UnixStream::pair().context("cannot create a unix socket pair")?;
        results.push(GROUP, UNIX, "MiB/s", Better::Higher, stream(a, b, stream_bytes)?);
    }

    ctx.progress(&format!(
        "floors: TCP over a veth pair, {} MiB per run",
        stream_bytes >> 20
    ));
    results.note(
        GROUP,
        TCP_VETH,
        &format!(
            "{} MiB in 1 MiB writes per run, two namespaces",
            stream_bytes >> 20
        ),
    );
    let pair = net::veth_pair(1)?;
    for _ in 0..ctx.runs {
        results.push(
            GROUP,
            TCP_VETH,
            "MiB/s",
            Better::Higher,
            tcp_over(&pair, stream_bytes)?,
        );
    }
    Ok(())
}

/// Sends `total` bytes from `tx` to `rx` (reader on another thread); returns MiB/s from first write to last read.
pub fn stream<W: Write + Send, R: Read + Send>(mut tx: W, mut rx: R, total: u64) -> Result<f64> {
    let t = Instant::now();
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<u64> {
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            while got < total {
                let n = rx.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok(got)
        });
        let chunk = vec![0xa5u8; CHUNK];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(CHUNK as u64) as usize;
            tx.write_all(&chunk[..n]).context("stream write")?;
            sent += n as u64;
        }
        drop(tx);
        let got = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?
            .context("stream read")?;
        anyhow::ensure!(got == total, "stream ended after {got} of {total} bytes");
        Ok(total as f64 / MIB / t.elapsed().as_secs_f64())
    })
}

/// A TCP stream from namespace b to a listener in namespace a: MiB/s.
pub fn tcp_over(pair: &VethPair, total: u64) -> Result<f64> {
    let (tx, rx) = connected(pair)?;
    stream(tx, rx, total)
}

/// A TCP connection across the pair: the sending end in namespace b, the receiving end in namespace a.
pub fn connected(pair: &VethPair) -> Result<(TcpStream, TcpStream)> {
    let listener = pair
        .a
        .try_run(|| TcpListener::bind(SocketAddr::new(pair.ip_a, 0)))?
        .context("cannot listen in the bench namespace")?;
    let addr = listener.local_addr()?;
    let tx = pair
        .b
        .try_run(|| TcpStream::connect(addr))?
        .context("cannot connect across the veth pair")?;
    let (rx, _) = listener.accept()?;
    Ok((tx, rx))
}
