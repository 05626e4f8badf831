//! `membrane-perf events`: flow events from the datapath to a GetFlows subscriber, without
//! loss, and what the pipeline costs in CPU (DESIGN §8: no loss at 100k events/s with
//! ≤ 0.25 core).
//!
//! The programs are loaded (private bpffs pins) with one endpoint in default deny, so every
//! packet run through `from_endpoint` with `BPF_PROG_TEST_RUN` is dropped with 133 and emits
//! one drop event into the ring buffer. A generator thread runs batches of 1000 packets paced
//! to the target rate; the agent's path does the rest as the agent does it: the ring buffer
//! reader, the conversion to the observer's input, the observer pipeline (enrichment, the
//! 4095-flow ring, metrics), the Hubble gRPC server on a Unix socket, and a `GetFlows
//! --follow` client counting flows (on a thread of its own). CPU is the process's (getrusage)
//! minus the generator thread's own (its CLOCK_THREAD_CPUTIME_ID, which includes the kernel
//! time of the runs) and the subscriber thread's: reader, pipeline and server.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use membrane_common::{Direction, names};
use membrane_datapath::{Datapath, EndpointEntry, FlowEventView, MapSizes};
use membrane_observer::{
    DatapathEvent, DatapathEventKind, DatapathVerdict, FlowInput, Observer, ObserverConfig,
    StaticEnricher,
    proto::observer::{
        GetFlowsRequest, get_flows_response::ResponseTypes, observer_client::ObserverClient,
    },
};
use membrane_tests::{PinGuard, packet};

const EP: u32 = 7;
const RATE: u64 = 100_000;
const SECONDS: u64 = 5;
const BATCH: u32 = 1000;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn process_cpu() -> Duration {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The agent's conversion (agent/src/daemon.rs `to_observer_event`), minus policy names.
fn convert(e: &FlowEventView) -> DatapathEvent {
    let age = membrane_datapath::maps::monotonic_ns().saturating_sub(e.timestamp_ns);
    DatapathEvent {
        time: SystemTime::now() - Duration::from_nanos(age),
        kind: match e.kind {
            membrane_datapath::EventKind::Drop => DatapathEventKind::Drop,
            membrane_datapath::EventKind::Trace => DatapathEventKind::Trace,
            membrane_datapath::EventKind::PolicyVerdict => DatapathEventKind::PolicyVerdict,
        },
        verdict: match e.verdict {
            membrane_datapath::EventVerdict::Forwarded => DatapathVerdict::Forwarded,
            membrane_datapath::EventVerdict::Dropped => DatapathVerdict::Dropped,
            membrane_datapath::EventVerdict::Redirected => DatapathVerdict::Redirected,
        },
        drop_reason: e.drop_reason,
        direction: match e.direction {
            Direction::Ingress => membrane_observer::Direction::Ingress,
            Direction::Egress => membrane_observer::Direction::Egress,
        },
        match_type: e.match_type,
        protocol: e.protocol,
        tcp_flags: e.tcp_flags,
        endpoint_id: e.endpoint_id,
        src_identity: e.src_identity,
        dst_identity: e.dst_identity,
        src: std::net::IpAddr::V4(e.src),
        sport: e.sport,
        dst: std::net::IpAddr::V4(e.dst),
        dport: e.dport,
        icmp_code: 0,
        proxy_port: e.proxy_port,
        ifindex: e.ifindex,
        is_reply: None,
        observation_point: None,
        policy: None,
    }
}

pub fn run() {
    let pins = PinGuard::new();
    let mut dp = Datapath::load(pins.path(), MapSizes::default()).expect("load the datapath");
    dp.endpoints()
        .upsert(EndpointEntry {
            ifindex: 1,
            endpoint_id: EP,
            identity: 500,
            enforce_ingress: true,
            enforce_egress: true,
        })
        .expect("endpoint");
    let mut reader = dp.take_events().expect("event reader");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let observer = {
        let _context = runtime.enter();
        Observer::spawn(
            ObserverConfig::default(),
            Arc::new(StaticEnricher::new("perf-node")),
        )
        .expect("observer")
    };
    let dir = std::env::temp_dir().join(format!("membrane-perf-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("hubble.sock");
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    {
        let _context = runtime.enter();
        let listener = membrane_observer::bind_unix(&socket).expect("bind");
        let obs = observer.clone();
        runtime.spawn(async move {
            let _ = membrane_observer::serve_unix(&obs, listener, async {
                let _ = server_stopped.await;
            })
            .await;
        });
    }
    // The subscriber: GetFlows --follow, counting flows, on a thread and runtime of its own
    // (a `hubble observe` elsewhere), so its CPU is measured apart from the pipeline's.
    let received = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(AtomicBool::new(false));
    let (end_subscriber, subscriber_end) = tokio::sync::oneshot::channel::<()>();
    let subscriber = {
        let (received, subscribed, path) = (received.clone(), subscribed.clone(), socket.clone());
        std::thread::spawn(move || -> Duration {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("subscriber runtime");
            runtime.block_on(async move {
                let channel = tonic::transport::Endpoint::from_static("http://localhost")
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .expect("connect to the observer");
                let mut stream = ObserverClient::new(channel)
                    .get_flows(GetFlowsRequest {
                        follow: true,
                        ..GetFlowsRequest::default()
                    })
                    .await
                    .expect("GetFlows")
                    .into_inner();
                subscribed.store(true, Ordering::SeqCst);
                let mut end = std::pin::pin!(subscriber_end);
                loop {
                    tokio::select! {
                        _ = &mut end => break,
                        message = stream.message() => match message {
                            Ok(Some(response)) => {
                                if let Some(ResponseTypes::Flow(_)) = response.response_types {
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => break,
                        },
                    }
                }
            });
            thread_cpu()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !subscribed.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The agent's reader loop.
    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let reader_thread = {
        let (stop, read, sender) = (stop.clone(), read.clone(), observer.sender());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for event in reader.wait(Duration::from_millis(50)).unwrap_or_default() {
                    read.fetch_add(1, Ordering::Relaxed);
                    sender.send(FlowInput::Datapath(convert(&event)));
                }
            }
        })
    };
    let frame = packet::tcp(
        (std::net::Ipv4Addr::new(10, 200, 0, 10), 40000),
        (std::net::Ipv4Addr::new(10, 200, 0, 20), 9090),
        packet::TCP_SYN,
    );
    println!(
        "flow events: {RATE}/s for {SECONDS} s from BPF_PROG_TEST_RUN drops to a GetFlows --follow subscriber"
    );
    let cpu_before = process_cpu();
    let started = Instant::now();
    let batches = RATE * SECONDS / u64::from(BATCH);
    let period = Duration::from_secs_f64(f64::from(BATCH) / RATE as f64);
    let mut generator_cpu = Duration::ZERO;
    let mut generated = 0u64;
    for i in 0..batches {
        let cpu0 = thread_cpu();
        dp.test_run_repeat(names::PROG_FROM_ENDPOINT, &frame, BATCH)
            .expect("test run");
        generator_cpu += thread_cpu() - cpu0;
        generated += u64::from(BATCH);
        let next = started + period * u32::try_from(i + 1).unwrap_or(u32::MAX);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let generating = started.elapsed();
    // Drain: until the subscriber has everything or nothing moves for a while.
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < generated && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed();
    let _ = end_subscriber.send(());
    let subscriber_cpu = subscriber.join().unwrap_or_default();
    let cpu = process_cpu()
        .saturating_sub(cpu_before)
        .saturating_sub(generator_cpu)
        .saturating_sub(subscriber_cpu);
    stop.store(true, Ordering::SeqCst);
    let _ = reader_thread.join();
    let kernel_lost = dp.metrics().events_lost().unwrap_or(0);
    let got = received.load(Ordering::Relaxed);
    println!(
        "generated {generated} in {generating:.2?} ({:.0}/s); ring buffer lost {kernel_lost}; read {}; subscriber received {got}; observer lost {:?}",
        generated as f64 / generating.as_secs_f64(),
        read.load(Ordering::Relaxed),
        observer.lost()
    );
    println!(
        "pipeline CPU (reader + observer + gRPC server): {:.3} s over {:.2} s = {:.3} core (target <= 0.25 at 100k/s, no loss); the subscriber: {:.3} core",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        cpu.as_secs_f64() / generating.as_secs_f64(),
        subscriber_cpu.as_secs_f64() / generating.as_secs_f64()
    );
    let _ = stop_server.send(());
    runtime.shutdown_timeout(Duration::from_secs(1));
    let _ = std::fs::remove_dir_all(&dir);
}
