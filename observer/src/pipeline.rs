//! The pipeline: producers → bounded queue → ingest task (enrich, convert, count) → ring.
//!
//! Producers never wait: [`FlowSender::send`] uses `try_send`, and an input that does not
//! fit is dropped and counted per producer. The ingest task turns the growth of those
//! counters (and of losses the agent reports from upstream, such as the datapath ring
//! buffer) into Hubble `LostEvent` entries in the ring, so `hubble observe` shows them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::convert;
use crate::enrich::Enricher;
use crate::input::{FlowInput, FlowSource};
use crate::metrics::{LostTotals, Metrics};
use crate::proto::flow::{LostEvent, LostEventSource};
use crate::proto::observer::ServerStatusResponse;
use crate::ring::{Ring, RingEvent};
use crate::timefmt;

/// Hubble's default ring capacity (`hubble-buffer-size`).
pub const DEFAULT_MAX_FLOWS: usize = 4095;
/// Default ingest queue capacity: a few hundred milliseconds of a busy node's events.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// How often the ingest task checks for losses when no events arrive.
const LOST_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Inputs converted per wake-up; bounds the time the ring lock is wanted in one go.
const INGEST_BATCH: usize = 256;

/// Pipeline settings.
#[derive(Clone, Debug)]
pub struct ObserverConfig {
    /// Flows (and lost-event notices) kept in the ring. Default 4095, like Hubble.
    pub max_flows: usize,
    /// Inputs the ingest queue holds before producers' events are dropped and counted.
    pub queue_capacity: usize,
    /// Reported as `ServerStatus.version`.
    pub version: String,
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            max_flows: DEFAULT_MAX_FLOWS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            version: concat!("membrane-observer/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Invalid [`ObserverConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("observer max_flows must be at least 1, got {0}")]
    MaxFlows(usize),
    #[error("observer queue_capacity must be at least 1, got {0}")]
    QueueCapacity(usize),
}

/// Loss counters, all cumulative.
#[derive(Default)]
pub(crate) struct LostCounters {
    /// Inputs dropped because the ingest queue was full, per producer.
    queue: [AtomicU64; 3],
    /// Losses the agent reported from before the queue, per producer.
    upstream: [AtomicU64; 3],
}

/// A snapshot of the loss counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostCounts {
    /// Dropped at the ingest queue, indexed datapath, proxy, dns.
    pub queue: [u64; 3],
    /// Reported upstream losses, indexed datapath, proxy, dns.
    pub upstream: [u64; 3],
}

impl LostCounts {
    /// Everything lost for one producer.
    pub fn total(&self, source: FlowSource) -> u64 {
        self.queue[source.index()] + self.upstream[source.index()]
    }

    /// Hubble's view: kernel ring losses are `PERF_EVENT_RING_BUFFER`, everything lost on
    /// the way to the observer is `OBSERVER_EVENTS_QUEUE`.
    fn hubble(&self) -> (u64, u64) {
        let perf = self.upstream[FlowSource::Datapath.index()];
        let queue = self.queue.iter().sum::<u64>()
            + self.upstream[FlowSource::Proxy.index()]
            + self.upstream[FlowSource::Dns.index()];
        (perf, queue)
    }

    fn totals(&self) -> LostTotals {
        let (perf, queue) = self.hubble();
        LostTotals {
            perf_event_ring_buffer: perf,
            observer_events_queue: queue,
            by_producer: FlowSource::ALL.map(|s| self.total(s)),
        }
    }
}

impl LostCounters {
    fn snapshot(&self) -> LostCounts {
        let load = |a: &[AtomicU64; 3]| a.each_ref().map(|c| c.load(Ordering::Relaxed));
        LostCounts {
            queue: load(&self.queue),
            upstream: load(&self.upstream),
        }
    }
}

/// State shared by the ingest task, the gRPC service and the handles.
pub(crate) struct Shared {
    pub(crate) ring: Ring,
    pub(crate) enricher: Arc<dyn Enricher>,
    pub(crate) metrics: Metrics,
    pub(crate) lost: LostCounters,
    pub(crate) seen_flows: AtomicU64,
    pub(crate) started: Instant,
    pub(crate) version: String,
}

impl Shared {
    pub(crate) fn node_name(&self) -> String {
        self.enricher.node_name()
    }

    pub(crate) fn server_status(&self) -> ServerStatusResponse {
        let now = timefmt::system_nanos(SystemTime::now());
        let minute_ago = now - 60 * 1_000_000_000;
        let (entries, _) = self.ring.snapshot();
        let recent = entries
            .iter()
            .rev()
            .filter_map(|e| match &e.event {
                RingEvent::Flow(f) => f.time.as_ref().and_then(timefmt::nanos),
                RingEvent::Lost(..) => None,
            })
            .take_while(|&t| t >= minute_ago)
            .count();
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let flows_rate = recent as f64 / 60.0;
        ServerStatusResponse {
            num_flows: entries.len() as u64,
            max_flows: self.ring.capacity() as u64,
            seen_flows: self.seen_flows.load(Ordering::Relaxed),
            uptime_ns: u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX),
            num_connected_nodes: None,
            num_unavailable_nodes: None,
            unavailable_nodes: Vec::new(),
            version: self.version.clone(),
            flows_rate,
        }
    }
}

#[expect(
    clippy::large_enum_variant,
    reason = "flushes are rare; boxing every input would cost an allocation per event"
)]
enum Msg {
    Input(FlowInput),
    Flush(oneshot::Sender<()>),
}

/// The flow pipeline: a cheap handle shared by the agent, producers and the gRPC service.
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Msg>,
}

/// Where producers send inputs; cheap to clone, never blocks.
#[derive(Clone)]
pub struct FlowSender {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Msg>,
}

/// The ingest task; run it with [`Ingest::run`] (or use [`Observer::spawn`]).
pub struct Ingest {
    shared: Arc<Shared>,
    queue: mpsc::Receiver<Msg>,
    /// Hubble-level losses already written to the ring: (perf ring, observer queue).
    reported: (u64, u64),
}

impl Observer {
    /// A pipeline and its ingest task, which the caller runs. The task ends once the
    /// observer and every [`FlowSender`] are dropped.
    pub fn new(
        config: ObserverConfig,
        enricher: Arc<dyn Enricher>,
    ) -> Result<(Self, Ingest), ConfigError> {
        if config.max_flows == 0 {
            return Err(ConfigError::MaxFlows(config.max_flows));
        }
        if config.queue_capacity == 0 {
            return Err(ConfigError::QueueCapacity(config.queue_capacity));
        }
        let shared = Arc::new(Shared {
            ring: Ring::new(config.max_flows),
            enricher,
            metrics: Metrics::default(),
            lost: LostCounters::default(),
            seen_flows: AtomicU64::new(0),
            started: Instant::now(),
            version: config.version,
        });
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let ingest = Ingest {
            shared: Arc::clone(&shared),
            queue: rx,
            reported: (0, 0),
        };
        Ok((Self { shared, queue: tx }, ingest))
    }

    /// [`Observer::new`] with the ingest task spawned on the current tokio runtime.
    pub fn spawn(config: ObserverConfig, enricher: Arc<dyn Enricher>) -> Result<Self, ConfigError> {
        let (observer, ingest) = Self::new(config, enricher)?;
        tokio::spawn(ingest.run());
        Ok(observer)
    }

    /// A handle for a producer.
    pub fn sender(&self) -> FlowSender {
        FlowSender {
            shared: Arc::clone(&self.shared),
            queue: self.queue.clone(),
        }
    }

    /// Records `count` events a producer lost before they reached the observer (e.g. the
    /// growth of the datapath's ring-buffer loss counter, or of the proxy's access-log
    /// drops). Pass deltas, not totals.
    pub fn report_lost(&self, source: FlowSource, count: u64) {
        self.shared.lost.upstream[source.index()].fetch_add(count, Ordering::Relaxed);
    }

    /// Waits until every input sent before this call is in the ring (and any loss counted
    /// by then is in the ring as a lost event). Needs the ingest task to be running.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Msg::Flush(tx)).await.is_ok() {
            // An error means the ingest task is gone; nothing more will be ingested.
            let _ = rx.await;
        }
    }

    /// What `ServerStatus` answers.
    pub fn server_status(&self) -> ServerStatusResponse {
        self.shared.server_status()
    }

    /// Loss counters.
    pub fn lost(&self) -> LostCounts {
        self.shared.lost.snapshot()
    }

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        self.shared
            .metrics
            .render(&self.shared.lost.snapshot().totals())
    }

    /// The flows currently in the ring, oldest first.
    pub fn flows(&self) -> Vec<Arc<crate::proto::flow::Flow>> {
        self.shared
            .ring
            .snapshot()
            .0
            .into_iter()
            .filter_map(|e| match e.event {
                RingEvent::Flow(f) => Some(f),
                RingEvent::Lost(..) => None,
            })
            .collect()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl FlowSender {
    /// Offers an input without waiting. Returns false (and counts the loss for the input's
    /// producer) when the queue is full or the pipeline is gone.
    pub fn send(&self, input: FlowInput) -> bool {
        let source = input.source();
        match self.queue.try_send(Msg::Input(input)) {
            Ok(()) => true,
            Err(_) => {
                self.shared.lost.queue[source.index()].fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

impl Ingest {
    /// Converts queued inputs into flows until every sender is gone.
    pub async fn run(mut self) {
        let mut batch = Vec::with_capacity(INGEST_BATCH);
        let mut tick = tokio::time::interval(LOST_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flushes = tokio::select! {
                n = self.queue.recv_many(&mut batch, INGEST_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.ingest(&mut batch)
                }
                _ = tick.tick() => Vec::new(),
            };
            self.record_losses();
            for done in flushes {
                // The flusher may have given up waiting; nothing to do then.
                let _ = done.send(());
            }
        }
        self.record_losses();
    }

    fn ingest(&self, batch: &mut Vec<Msg>) -> Vec<oneshot::Sender<()>> {
        let shared = &self.shared;
        let node_name = shared.node_name();
        let mut flushes = Vec::new();
        let mut events = Vec::with_capacity(batch.len());
        for msg in batch.drain(..) {
            match msg {
                Msg::Input(input) => {
                    let flow = convert::to_flow(&input, shared.enricher.as_ref(), &node_name);
                    shared.metrics.observe(&flow);
                    events.push(RingEvent::Flow(Arc::new(flow)));
                }
                Msg::Flush(done) => flushes.push(done),
            }
        }
        shared
            .seen_flows
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        shared.ring.push(events);
        flushes
    }

    /// Writes a `LostEvent` per Hubble source whose counter grew since the last check.
    fn record_losses(&mut self) {
        let (perf, queue) = self.shared.lost.snapshot().hubble();
        let now = timefmt::timestamp(SystemTime::now());
        let mut events = Vec::new();
        for (total, reported, source) in [
            (
                perf,
                &mut self.reported.0,
                LostEventSource::PerfEventRingBuffer,
            ),
            (
                queue,
                &mut self.reported.1,
                LostEventSource::ObserverEventsQueue,
            ),
        ] {
            if total > *reported {
                events.push(RingEvent::Lost(
                    LostEvent {
                        source: source as i32,
                        num_events_lost: total - *reported,
                        cpu: None,
                    },
                    now,
                ));
                *reported = total;
            }
        }
        if !events.is_empty() {
            self.shared.ring.push(events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::tests::{datapath, enricher, http};
    use crate::input::{DatapathEventKind, DatapathVerdict, L7Kind, L7Verdict};

    fn input(n: u16) -> FlowInput {
        let mut ev = datapath(DatapathEventKind::Trace, DatapathVerdict::Forwarded);
        ev.sport = n;
        FlowInput::Datapath(ev)
    }

    #[tokio::test]
    async fn full_queue_counts_losses_per_producer_and_never_blocks() {
        let config = ObserverConfig {
            max_flows: 16,
            queue_capacity: 4,
            ..ObserverConfig::default()
        };
        let (observer, ingest) = Observer::new(config, Arc::new(enricher())).expect("config");
        let sender = observer.sender();
        // The ingest task is not running yet: the queue fills up and the rest is dropped.
        let accepted = (0..6).filter(|&n| sender.send(input(n))).count();
        assert_eq!(accepted, 4);
        assert!(!sender.send(FlowInput::Http(http(
            L7Kind::Request,
            L7Verdict::Forwarded,
            None
        ))));
        observer.report_lost(FlowSource::Datapath, 7);
        let lost = observer.lost();
        assert_eq!(lost.queue, [2, 1, 0]);
        assert_eq!(lost.total(FlowSource::Datapath), 9);

        tokio::spawn(ingest.run());
        tokio::time::timeout(Duration::from_secs(10), observer.flush())
            .await
            .expect("flush in time");
        assert_eq!(observer.flows().len(), 4);
        let status = observer.server_status();
        assert_eq!(
            (status.num_flows, status.seen_flows, status.max_flows),
            (6, 4, 16)
        );

        let (entries, _) = observer.shared().ring.snapshot();
        let lost: Vec<(i32, u64)> = entries
            .iter()
            .filter_map(|e| match &e.event {
                RingEvent::Lost(l, _) => Some((l.source, l.num_events_lost)),
                RingEvent::Flow(_) => None,
            })
            .collect();
        assert_eq!(
            lost,
            [
                (LostEventSource::PerfEventRingBuffer as i32, 7),
                (LostEventSource::ObserverEventsQueue as i32, 3)
            ]
        );
        let metrics = observer.render_metrics();
        assert!(metrics.contains("hubble_lost_events_total{source=\"observer_events_queue\"} 3"));
        assert!(metrics.contains("membrane_flows_lost_total{source=\"datapath\"} 9"));
    }

    #[tokio::test]
    async fn ring_keeps_only_the_newest() {
        let config = ObserverConfig {
            max_flows: 3,
            ..ObserverConfig::default()
        };
        let observer = Observer::spawn(config, Arc::new(enricher())).expect("config");
        let sender = observer.sender();
        for n in 0..10 {
            assert!(sender.send(input(n)));
        }
        tokio::time::timeout(Duration::from_secs(10), observer.flush())
            .await
            .expect("flush in time");
        let ports: Vec<u32> = observer
            .flows()
            .iter()
            .filter_map(|f| match f.l4.as_ref()?.protocol.as_ref()? {
                crate::proto::flow::layer4::Protocol::Tcp(t) => Some(t.source_port),
                _ => None,
            })
            .collect();
        assert_eq!(ports, [7, 8, 9]);
        assert_eq!(observer.server_status().seen_flows, 10);
    }

    #[test]
    fn zero_capacities_are_refused() {
        let bad = ObserverConfig {
            max_flows: 0,
            ..ObserverConfig::default()
        };
        assert!(Observer::new(bad, Arc::new(enricher())).is_err());
    }
}
