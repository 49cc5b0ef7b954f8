//! Privileged VMM tests: the real guest on real KVM, with a tap in a namespace of its own and TCP clients in
//! another, all through the `migrator` library (no migration: that is tests/migration.rs).
//!
//! ```text
//!  client netns                 host netns
//!  10.99.N.1 ── veth ───────── br ── tapA ── VM A (10.99.N.2)
//!                                 └─ tapB ── VM B (restored copy of A)
//! ```
//!
//! Figures (boot time, idle CPU, exit cost, echo round trip) are printed for the record, never asserted.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use guest_abi::{ECHO_PORT, GuestMark, RR_PORT, STREAM_PORT, STREAM_RECORD};
use integration_tests::{Netns, VmHost, kvm_available, migrator_bin};
use migrator::vm::{SerialOutput, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x76, 0x6d, 0x6d];

/// Namespaces, bridge, veth and taps; removed with the namespaces on drop.
struct Topology {
    taps: Vec<String>,
    host: Netns,
    client: Netns,
    subnet: u8,
}

impl Topology {
    fn new(taps: usize) -> Self {
        let subnet = (std::process::id() % 200) as u8 + 20;
        let client_ip = Ipv4Addr::new(10, 99, subnet, 1);
        let VmHost {
            host, client, taps, ..
        } = VmHost::create("vm", taps, client_ip.into(), 24).expect("build the test's host and client");
        Self {
            taps,
            host,
            client,
            subnet,
        }
    }

    fn guest_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, self.subnet, 2)
    }

    fn config(&self, tap: usize, dirty: Option<(u64, u64)>) -> VmConfig {
        VmConfig {
            ram_bytes: 128 << 20,
            tap: self.taps[tap].clone(),
            mac: MAC,
            ipv4: self.guest_ip(),
            prefix_len: 24,
            gateway: None,
            ipv6: None,
            dirty_bytes: dirty.map_or(0, |d| d.0),
            dirty_rate: dirty.map_or(0, |d| d.1),
            serial: SerialOutput::Stderr {
                prefix: format!("[{}] ", self.taps[tap]),
            },
        }
    }

    /// Creates (and for a fresh boot, starts) a VM inside the host namespace, where its tap is.
    fn boot(&self, config: &VmConfig) -> Vm {
        self.host.run(|| {
            let mut vm = Vm::create(config).expect("create the VM");
            vm.start().expect("start the VM");
            vm
        })
    }

    fn connect(&self, port: u16) -> TcpStream {
        let addr = SocketAddrV4::new(self.guest_ip(), port);
        let s = self
            .client
            .run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("connect to the guest's port {port}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("send to echo");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo reply");
    assert_eq!(back, msg, "the echo differs");
}

fn check_stream(s: &mut TcpStream, records: u64, mut expect: u64) -> u64 {
    let mut rec = [0u8; STREAM_RECORD];
    for _ in 0..records {
        s.read_exact(&mut rec).expect("stream record");
        let n = u64::from_be_bytes(rec[..8].try_into().expect("8 bytes"));
        assert_eq!(n, expect, "stream record out of sequence");
        assert!(
            rec[8..].iter().all(|&b| b == n as u8),
            "record {n} payload corrupted"
        );
        expect += 1;
    }
    expect
}

fn request(s: &mut TcpStream, seq: u32, len: u32) {
    let mut req = seq.to_be_bytes().to_vec();
    req.extend_from_slice(&len.to_be_bytes());
    s.write_all(&req).expect("send request");
    let mut resp = vec![0u8; 4 + len as usize];
    s.read_exact(&mut resp).expect("response");
    assert_eq!(u32::from_be_bytes(resp[..4].try_into().expect("4 bytes")), seq);
    assert!(
        resp[4..].iter().all(|&b| b == seq as u8),
        "response {seq} corrupted"
    );
}

fn process_cpu() -> Duration {
    // SAFETY: rusage is plain data and getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    let tv =
        |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Copies guest RAM from `src` to `dst` (both paused or not started), as a migration would.
fn copy_ram(src: &Vm, dst: &Vm) {
    let mut buf = vec![0u8; 1 << 20];
    for region in src.memory().iter() {
        let start = region.start_addr().0;
        let mut off = 0;
        while off < region.len() {
            let n = buf.len().min((region.len() - off) as usize);
            src.memory()
                .read_slice(&mut buf[..n], GuestAddress(start + off))
                .expect("read source RAM");
            dst.memory()
                .write_slice(&buf[..n], GuestAddress(start + off))
                .expect("write destination RAM");
            off += n as u64;
        }
    }
}

/// 200 echo round trips: prints the average round trip, VM exits and host CPU per round trip.
fn echo_figures(vm: &Vm, e: &mut TcpStream) {
    let stats0 = vm.vcpu_stats();
    let cpu0 = process_cpu();
    let t = Instant::now();
    let rounds = 200;
    for i in 0..rounds {
        echo(e, format!("echo {i}").as_bytes());
    }
    let elapsed = t.elapsed();
    let cpu = process_cpu().saturating_sub(cpu0);
    let exits = vm.vcpu_stats().exits - stats0.exits;
    eprintln!(
        "figure: echo round trip {:.1} us average over {rounds}; {:.1} VM exits and {:.0} us of host CPU per round trip",
        elapsed.as_secs_f64() * 1e6 / f64::from(rounds),
        exits as f64 / f64::from(rounds),
        cpu.as_secs_f64() * 1e6 / f64::from(rounds)
    );
}

#[test]
fn boots_serves_pauses_and_restores() {
    if !kvm_available("the VMM tests") {
        return;
    }
    let topo = Topology::new(2);
    let t0 = Instant::now();
    let config = topo.config(0, None);
    let mut vm = topo.host.run(|| Vm::create(&config).expect("create the VM"));
    let created = t0.elapsed();
    vm.start().expect("start the VM");
    vm.wait_guest_mark(GuestMark::Ready, 1, Duration::from_secs(60))
        .expect("the guest reports Ready");
    eprintln!(
        "figure: boot to Ready {} ms (VM creation {} ms, guest start to Ready {} ms)",
        t0.elapsed().as_millis(),
        created.as_millis(),
        t0.elapsed().saturating_sub(created).as_millis()
    );

    // Echo, stream and request/response from the client namespace.
    let mut e = topo.connect(ECHO_PORT);
    echo_figures(&vm, &mut e);
    echo(&mut e, &vec![0x5a; 20_000]);

    let mut st = topo.connect(STREAM_PORT);
    st.write_all(&0u32.to_be_bytes()).expect("stream rate");
    let next = check_stream(&mut st, 2000, 0);

    let mut rr = topo.connect(RR_PORT);
    for seq in 0..50 {
        request(&mut rr, seq, seq * 100);
    }

    // Idle host CPU: nothing is sent for a while (the stream is throttled by its unread window).
    let cpu0 = process_cpu();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let idle = process_cpu().saturating_sub(cpu0).as_secs_f64() / t.elapsed().as_secs_f64();
    eprintln!("figure: idle host CPU {:.2} % of one core", idle * 100.0);

    // Dirty tracking: RX delivery by the VMM shows up in the dirty set (KVM log OR VMM bitmap).
    vm.start_dirty_log().expect("start dirty log");
    vm.take_dirty_pages().expect("clear");
    echo(&mut e, b"dirty me");
    let dirty = vm.take_dirty_pages().expect("dirty pages");
    assert!(dirty.count_ones() > 0, "an echo exchange dirtied no page");
    eprintln!(
        "figure: pages dirtied by one echo exchange: {}",
        dirty.count_ones()
    );
    vm.stop_dirty_log().expect("stop dirty log");

    // Pause: frames that arrive now are held by the VMM, not delivered; resume delivers them.
    vm.pause().expect("pause");
    e.write_all(b"while paused").expect("send while paused");
    let t = Instant::now();
    let mut held = Vec::new();
    while held.is_empty() && t.elapsed() < Duration::from_secs(5) {
        held = vm.take_pending_frames();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !held.is_empty(),
        "the frame sent during the pause never reached the VMM"
    );
    vm.deliver_frames(held);
    vm.resume().expect("resume");
    let mut back = [0u8; 12];
    e.read_exact(&mut back)
        .expect("echo of the frame held during the pause");
    assert_eq!(&back, b"while paused");

    // Save, then restore into a second VM on another tap with a copy of RAM: the connections carry on.
    vm.pause().expect("pause for save");
    let state = vm.save_state().expect("save state");
    let bytes = state.encode().expect("encode");
    let decoded = migrator::vm_state::VmState::decode(&bytes).expect("decode");
    assert_eq!(decoded, state);
    let frames = vm.take_pending_frames();
    let mut b = topo
        .host
        .run(|| Vm::create_for_restore(&topo.config(1, None)).expect("create B"));
    copy_ram(&vm, &b);
    b.restore_state(&decoded).expect("restore into B");
    vm.shutdown();
    let t = Instant::now();
    b.start().expect("start B");
    b.deliver_frames(frames);
    // The bridge still points the MAC at tap A: the guest's own traffic (a GARP) moves it.
    b.request_garp().expect("ask for a GARP");
    b.wait_guest_mark(GuestMark::GarpSent, 1, Duration::from_secs(10))
        .expect("B's guest sends the GARP");
    echo(&mut e, b"after restore");
    eprintln!(
        "figure: restored guest answered {} ms after start",
        t.elapsed().as_millis()
    );
    check_stream(&mut st, 2000, next);
    request(&mut rr, 1000, 512);
    assert!(
        b.wait_exit(Some(Duration::ZERO)).is_none(),
        "the restored guest stopped"
    );
    b.shutdown();
}

#[test]
fn dirtier_dirties_its_working_set() {
    if !kvm_available("the VMM tests") {
        return;
    }
    let topo = Topology::new(1);
    // 8 MiB at 64 MiB/s: a full pass every 125 ms. (The guest runs at CPL 3, which kvm_pvm runs natively; at CPL 0
    // its instruction emulator managed a few hundred KiB/s.)
    let working_set = 8u64 << 20;
    let mut vm = topo.boot(&topo.config(0, Some((working_set, 64 << 20))));
    vm.wait_guest_mark(GuestMark::Ready, 1, Duration::from_secs(60))
        .expect("the guest reports Ready");
    vm.start_dirty_log().expect("start dirty log");
    vm.take_dirty_pages().expect("clear");
    let pages = working_set / 4096;
    let t = Instant::now();
    let mut seen = migrator::ram::DirtyBitmap::new(vm.guest_ram().expect("ram view").total_pages());
    // Poll (with a deadline) until a whole pass shows up in the union of the dirty sets taken.
    while seen.count_ones() < pages && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        seen.union_with(&vm.take_dirty_pages().expect("dirty pages"));
    }
    eprintln!(
        "figure: {} pages dirty after {} ms with 8 MiB @ 64 MiB/s",
        seen.count_ones(),
        t.elapsed().as_millis()
    );
    assert!(
        seen.count_ones() >= pages,
        "only {} pages dirty, the working set has {pages}",
        seen.count_ones()
    );
    // Pause/save/resume while the dirtier runs, as a migration's switch-over does.
    let mut pauses = Vec::new();
    let mut saves = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        vm.pause().expect("pause");
        pauses.push(t.elapsed());
        let t = Instant::now();
        let state = vm.save_state().expect("save state while paused");
        saves.push(t.elapsed());
        assert_eq!(state.ram_bytes, vm.ram_bytes());
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(10));
    }
    pauses.sort();
    saves.sort();
    eprintln!(
        "figure: with the dirtier running, pause() median {:?} max {:?}; save_state() median {:?} max {:?}",
        pauses[10], pauses[19], saves[10], saves[19]
    );
    vm.take_dirty_pages().expect("clear");
    let t = Instant::now();
    let mut after = 0;
    while after == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        after = vm.take_dirty_pages().expect("dirty pages").count_ones();
    }
    assert!(
        after > 0,
        "the guest stopped dirtying after the pause/resume cycles"
    );
    vm.stop_dirty_log().expect("stop dirty log");
    vm.shutdown();
}

#[test]
fn missing_tap_is_a_clear_error() {
    if !kvm_available("the VMM tests") {
        return;
    }
    let host = Netns::new("vmx");
    let config = VmConfig {
        ram_bytes: 64 << 20,
        tap: "nosuchtap0".into(),
        mac: MAC,
        ipv4: Ipv4Addr::new(10, 0, 0, 2),
        prefix_len: 24,
        gateway: None,
        ipv6: None,
        dirty_bytes: 0,
        dirty_rate: 0,
        serial: SerialOutput::Discard,
    };
    let err = host.run(|| Vm::create(&config).expect_err("no tap"));
    let text = format!("{:#}", anyhow_chain(&err));
    assert!(text.contains("ip tuntap add dev nosuchtap0 mode tap"), "{text}");
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A minimal ELF64 executable with one `PT_LOAD` segment holding `code` at [`guest_abi::IMAGE_ADDR`].
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let entry = guest_abi::IMAGE_ADDR;
    let mut out = vec![0u8; 64 + 56];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // 64-bit
    out[5] = 1; // little endian
    out[6] = 1;
    out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&64u64.to_le_bytes());
    out[54..56].copy_from_slice(&56u16.to_le_bytes());
    out[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    out[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    out[ph + 16..ph + 24].copy_from_slice(&entry.to_le_bytes());
    out[ph + 24..ph + 32].copy_from_slice(&entry.to_le_bytes());
    out[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    out[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    out.extend_from_slice(code);
    out
}

/// Boots `code` as a tiny guest on tap 0 and runs it until it exits through `PORT_EXIT` with status 0, after more
/// than `n` port exits. Returns the VM and how long it ran.
fn run_exit_loop(topo: &Topology, code: &[u8], n: u32, what: &str) -> (Vm, Duration) {
    let config = topo.config(0, None);
    let mut vm = topo
        .host
        .run(|| Vm::create_with_image(&config, &tiny_elf(code)).expect("create the VM"));
    let t = Instant::now();
    vm.start().expect("start");
    let exit = vm.wait_exit(Some(Duration::from_secs(60)));
    let elapsed = t.elapsed();
    assert_eq!(
        exit,
        Some(migrator::vcpu::GuestExit::Status(0)),
        "{what} did not finish"
    );
    let pio = vm.vcpu_stats().pio;
    assert!(pio > u64::from(n), "only {pio} port exits");
    (vm, elapsed)
}

/// The cost of a VM exit to the VMM and back: a guest that does nothing but `out` to an unused port N times, then
/// exits through `PORT_EXIT`.
#[test]
fn exit_cost() {
    const N: u32 = 20_000;
    if !kvm_available("the VMM tests") {
        return;
    }
    let mut code = vec![0x66, 0xba, 0x13, 0x05]; // mov dx, 0x513 (unused port)
    code.push(0xb9); // mov ecx, N
    code.extend_from_slice(&N.to_le_bytes());
    code.extend_from_slice(&[0xee, 0xff, 0xc9, 0x75, 0xfb]); // 1: out dx, al; dec ecx; jnz 1b
    code.extend_from_slice(&[0x66, 0xba, 0x11, 0x05]); // mov dx, PORT_EXIT
    code.extend_from_slice(&[0x31, 0xc0, 0xef]); // xor eax, eax; out dx, eax
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // 2: hlt; jmp 2b
    let topo = Topology::new(1);
    let (vm, elapsed) = run_exit_loop(&topo, &code, N, "the exit-loop guest");
    let stats = vm.vcpu_stats();
    eprintln!(
        "figure: VM exit to the VMM and back: {:.2} us ({} exits in {} ms)",
        elapsed.as_secs_f64() * 1e6 / stats.exits as f64,
        stats.exits,
        elapsed.as_millis()
    );
    vm.shutdown();
}

/// A guest that drops to CPL 3 (user segments and user-accessible pages from the VMM, IOPL 3), sleeps once through
/// `PORT_IDLE`, runs the exit loop there and exits. On software KVM, CPL 3 runs natively: this prints the exit cost
/// without the instruction emulator in the way.
#[test]
fn guest_runs_at_cpl3_and_idles_through_the_port() {
    const N: u32 = 20_000;
    if !kvm_available("the VMM tests") {
        return;
    }
    let mut code = vec![0x48, 0xc7, 0xc4, 0x00, 0x00, 0x40, 0x00]; // mov rsp, 0x400000
    code.extend_from_slice(&[0x6a, guest_abi::USER_DS as u8]); // push USER_DS (ss)
    code.extend_from_slice(&[0x68, 0x00, 0x00, 0x40, 0x00]); // push 0x400000 (rsp)
    code.extend_from_slice(&[0x68, 0x02, 0x30, 0x00, 0x00]); // push 0x3002 (rflags: IOPL 3)
    code.extend_from_slice(&[0x6a, guest_abi::USER_CS as u8]); // push USER_CS
    code.extend_from_slice(&[0x48, 0x8d, 0x05, 0x03, 0x00, 0x00, 0x00]); // lea rax, [rip + 3] (the user code)
    code.extend_from_slice(&[0x50, 0x48, 0xcf]); // push rax; iretq
    // At CPL 3: sleep 1 ms through PORT_IDLE.
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&guest_abi::PORT_IDLE.to_le_bytes()); // mov dx, PORT_IDLE
    code.extend_from_slice(&[0xb8, 0xe8, 0x03, 0x00, 0x00, 0xef]); // mov eax, 1000; out dx, eax
    code.push(0xb9); // mov ecx, N
    code.extend_from_slice(&N.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0x14, 0x05]); // mov dx, 0x514 (unused port)
    code.extend_from_slice(&[0xee, 0xff, 0xc9, 0x75, 0xfb]); // 1: out dx, al; dec ecx; jnz 1b
    code.extend_from_slice(&[0x66, 0xba, 0x11, 0x05]); // mov dx, PORT_EXIT
    code.extend_from_slice(&[0x31, 0xc0, 0xef]); // xor eax, eax; out dx, eax
    code.extend_from_slice(&[0xeb, 0xfe]); // 2: jmp 2b (no hlt at CPL 3)
    let topo = Topology::new(1);
    let (mut vm, elapsed) = run_exit_loop(&topo, &code, N, "the CPL 3 guest");
    let stats = vm.vcpu_stats();
    assert!(stats.halts >= 1, "the PORT_IDLE sleep was not taken");
    eprintln!(
        "figure: VM exit to the VMM and back from CPL 3: {:.2} us ({} exits in {} ms, 1 ms of it asleep)",
        elapsed.as_secs_f64() * 1e6 / stats.exits as f64,
        stats.exits,
        elapsed.as_millis()
    );
    vm.pause().expect("pause");
    let state = vm.save_state().expect("save");
    assert_eq!(
        state.vcpu.sregs.cs.selector,
        guest_abi::USER_CS,
        "the guest is not at CPL 3"
    );
    vm.shutdown();
}

/// `migrator run` as a user runs it: a clear error for a missing tap, the Ready line, and a clean exit on Ctrl-C.
#[test]
fn run_command_reports_ready_and_stops_on_ctrl_c() {
    use std::{
        io::{BufRead, BufReader},
        process::{Command, Stdio},
    };
    if !kvm_available("the VMM tests") {
        return;
    }
    let topo = Topology::new(1);
    let ip = format!("{}/24", topo.guest_ip());
    let netns_run = |tap: &str| {
        Command::new("ip")
            .args(["netns", "exec", &topo.host.name])
            .arg(migrator_bin())
            .args([
                "run",
                "--tap",
                tap,
                "--mac",
                "52:54:00:76:6d:6e",
                "--ip",
                &ip,
                "--mem",
                "64M",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start migrator run")
    };

    let missing = netns_run("nosuchtap1").wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{err}");
    assert!(err.contains("ip tuntap add dev nosuchtap1 mode tap"), "{err}");

    let mut child = netns_run(&topo.taps[0]);
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("ready after") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("migrator run reports the guest ready");
    let mut e = topo.connect(ECHO_PORT);
    echo(&mut e, b"via the binary");
    // SAFETY: kill(2) with the child's pid, which we have not waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "migrator run ignored SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "migrator run exited with {status} after SIGINT");
    reader.join().expect("stderr reader");
}
