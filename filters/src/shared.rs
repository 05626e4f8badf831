//! State shared by every instance of a host: proxy-wasm shared data (per `vm_id`, with CAS),
//! shared queues, and filter metrics. Instances of one filter are pooled, so anything a guest
//! expects to outlive one instance (counters, key-value data) lives here, not in guest memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::abi::{metric, status};

/// Locks, recovering from poisoning: every critical section here leaves the data consistent
/// (single inserts/updates), so a panic elsewhere must not take the data plane down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type DataKey = (Arc<str>, Vec<u8>);

#[derive(Default)]
pub(crate) struct SharedState {
    /// (vm_id, key) → (value, cas).
    data: Mutex<HashMap<DataKey, (Vec<u8>, u32)>>,
    queues: Mutex<Queues>,
    metrics: Mutex<Metrics>,
}

#[derive(Default)]
struct Queues {
    /// Index + 1 is the queue id handed to guests (0 is never a valid id).
    list: Vec<Queue>,
    by_name: HashMap<(Arc<str>, Vec<u8>), u32>,
}

struct Queue {
    items: VecDeque<Vec<u8>>,
}

/// Longest a queue may grow before enqueues fail (protects the host from a guest that never
/// dequeues).
const MAX_QUEUE_ITEMS: usize = 10_000;
/// Largest shared-data value.
const MAX_SHARED_VALUE: usize = 1 << 20;

/// The kind of a filter-defined metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's current value, for export (the lead maps these to Prometheus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricSnapshot {
    pub filter: Arc<str>,
    /// The name the filter defined (Envoy prefixes it with `wasmcustom.`; we leave it raw).
    pub name: String,
    pub kind: MetricKind,
    /// Counter total or gauge value (0 for histograms).
    pub value: i64,
    /// Histogram: number of recorded values and their sum.
    pub count: u64,
    pub sum: u64,
}

#[derive(Default)]
struct Metrics {
    list: Vec<MetricSnapshot>,
    by_name: HashMap<(Arc<str>, String), u32>,
}

impl SharedState {
    pub fn get_data(&self, vm_id: &Arc<str>, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        lock(&self.data)
            .get(&(vm_id.clone(), key.to_vec()))
            .cloned()
    }

    /// Envoy semantics: `cas == 0` sets unconditionally; otherwise it must equal the current
    /// cas (or the key must be absent). Every successful set assigns a new cas.
    pub fn set_data(&self, vm_id: &Arc<str>, key: &[u8], value: &[u8], cas: u32) -> u32 {
        if value.len() > MAX_SHARED_VALUE {
            return status::BAD_ARGUMENT;
        }
        let mut data = lock(&self.data);
        let entry = data.entry((vm_id.clone(), key.to_vec()));
        match entry {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let (v, current) = e.get_mut();
                if cas != 0 && cas != *current {
                    return status::CAS_MISMATCH;
                }
                *v = value.to_vec();
                *current = current.wrapping_add(1).max(1);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((value.to_vec(), 1));
            }
        }
        status::OK
    }

    pub fn register_queue(&self, vm_id: &Arc<str>, name: &[u8]) -> u32 {
        let mut q = lock(&self.queues);
        let key = (vm_id.clone(), name.to_vec());
        if let Some(id) = q.by_name.get(&key) {
            return *id;
        }
        q.list.push(Queue {
            items: VecDeque::new(),
        });
        let id = q.list.len() as u32;
        q.by_name.insert(key, id);
        id
    }

    pub fn resolve_queue(&self, vm_id: &[u8], name: &[u8]) -> Option<u32> {
        let vm_id: Arc<str> = String::from_utf8_lossy(vm_id).into();
        lock(&self.queues)
            .by_name
            .get(&(vm_id, name.to_vec()))
            .copied()
    }

    pub fn enqueue(&self, id: u32, value: &[u8]) -> u32 {
        let mut q = lock(&self.queues);
        let Some(queue) = id.checked_sub(1).and_then(|i| q.list.get_mut(i as usize)) else {
            return status::NOT_FOUND;
        };
        if queue.items.len() >= MAX_QUEUE_ITEMS {
            return status::INTERNAL_FAILURE;
        }
        queue.items.push_back(value.to_vec());
        status::OK
    }

    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, u32> {
        let mut q = lock(&self.queues);
        let queue = id
            .checked_sub(1)
            .and_then(|i| q.list.get_mut(i as usize))
            .ok_or(status::NOT_FOUND)?;
        queue.items.pop_front().ok_or(status::EMPTY)
    }

    /// `proxy_define_metric`: the same (filter, name) returns the same id.
    pub fn define_metric(&self, filter: &Arc<str>, kind: u32, name: &str) -> Result<u32, u32> {
        let kind = match kind {
            metric::COUNTER => MetricKind::Counter,
            metric::GAUGE => MetricKind::Gauge,
            metric::HISTOGRAM => MetricKind::Histogram,
            _ => return Err(status::BAD_ARGUMENT),
        };
        let mut m = lock(&self.metrics);
        let key = (filter.clone(), name.to_owned());
        if let Some(id) = m.by_name.get(&key) {
            let existing = &m.list[(*id - 1) as usize];
            return if existing.kind == kind {
                Ok(*id)
            } else {
                Err(status::BAD_ARGUMENT)
            };
        }
        m.list.push(MetricSnapshot {
            filter: filter.clone(),
            name: name.to_owned(),
            kind,
            value: 0,
            count: 0,
            sum: 0,
        });
        let id = m.list.len() as u32;
        m.by_name.insert(key, id);
        Ok(id)
    }

    fn with_metric<R>(
        &self,
        filter: &Arc<str>,
        id: u32,
        f: impl FnOnce(&mut MetricSnapshot) -> Result<R, u32>,
    ) -> Result<R, u32> {
        let mut m = lock(&self.metrics);
        let metric = id
            .checked_sub(1)
            .and_then(|i| m.list.get_mut(i as usize))
            .filter(|m| m.filter == *filter)
            .ok_or(status::NOT_FOUND)?;
        f(metric)
    }

    /// Envoy: counters only go up; gauges move both ways; histograms cannot be incremented.
    pub fn increment_metric(&self, filter: &Arc<str>, id: u32, delta: i64) -> u32 {
        let r = self.with_metric(filter, id, |m| match m.kind {
            MetricKind::Counter if delta < 0 => Err(status::BAD_ARGUMENT),
            MetricKind::Counter | MetricKind::Gauge => {
                m.value = m.value.saturating_add(delta);
                Ok(())
            }
            MetricKind::Histogram => Err(status::BAD_ARGUMENT),
        });
        r.err().unwrap_or(status::OK)
    }

    /// Envoy: counter adds, gauge sets, histogram records.
    pub fn record_metric(&self, filter: &Arc<str>, id: u32, value: u64) -> u32 {
        let r = self.with_metric(filter, id, |m| {
            match m.kind {
                MetricKind::Counter => {
                    m.value = m
                        .value
                        .saturating_add(i64::try_from(value).unwrap_or(i64::MAX))
                }
                MetricKind::Gauge => m.value = i64::try_from(value).unwrap_or(i64::MAX),
                MetricKind::Histogram => {
                    m.count += 1;
                    m.sum = m.sum.saturating_add(value);
                }
            }
            Ok(())
        });
        r.err().unwrap_or(status::OK)
    }

    pub fn get_metric(&self, filter: &Arc<str>, id: u32) -> Result<u64, u32> {
        self.with_metric(filter, id, |m| match m.kind {
            MetricKind::Histogram => Err(status::BAD_ARGUMENT),
            _ => Ok(m.value as u64),
        })
    }

    pub fn metrics(&self) -> Vec<MetricSnapshot> {
        lock(&self.metrics).list.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_cas() {
        let s = SharedState::default();
        let vm: Arc<str> = "vm".into();
        assert_eq!(s.get_data(&vm, b"k"), None);
        assert_eq!(s.set_data(&vm, b"k", b"v1", 0), status::OK);
        let (v, cas) = s.get_data(&vm, b"k").unwrap();
        assert_eq!(v, b"v1");
        assert_eq!(s.set_data(&vm, b"k", b"v2", cas + 7), status::CAS_MISMATCH);
        assert_eq!(s.set_data(&vm, b"k", b"v2", cas), status::OK);
        assert_ne!(s.get_data(&vm, b"k").unwrap().1, cas);
        let other: Arc<str> = "other".into();
        assert_eq!(s.get_data(&other, b"k"), None);
    }

    #[test]
    fn queues() {
        let s = SharedState::default();
        let vm: Arc<str> = "vm".into();
        let id = s.register_queue(&vm, b"q");
        assert_eq!(s.register_queue(&vm, b"q"), id);
        assert_eq!(s.resolve_queue(b"vm", b"q"), Some(id));
        assert_eq!(s.resolve_queue(b"vm", b"nope"), None);
        assert_eq!(s.dequeue(id), Err(status::EMPTY));
        assert_eq!(s.enqueue(id, b"a"), status::OK);
        assert_eq!(s.dequeue(id), Ok(b"a".to_vec()));
        assert_eq!(s.enqueue(99, b"a"), status::NOT_FOUND);
        assert_eq!(s.dequeue(0), Err(status::NOT_FOUND));
    }

    #[test]
    fn metric_semantics_follow_envoy() {
        let s = SharedState::default();
        let f: Arc<str> = "f".into();
        let c = s.define_metric(&f, metric::COUNTER, "c").unwrap();
        let g = s.define_metric(&f, metric::GAUGE, "g").unwrap();
        let h = s.define_metric(&f, metric::HISTOGRAM, "h").unwrap();
        assert_eq!(s.define_metric(&f, metric::COUNTER, "c"), Ok(c));
        assert_eq!(s.define_metric(&f, 9, "x"), Err(status::BAD_ARGUMENT));
        assert_eq!(s.increment_metric(&f, c, 2), status::OK);
        assert_eq!(s.increment_metric(&f, c, -1), status::BAD_ARGUMENT);
        assert_eq!(s.record_metric(&f, c, 3), status::OK);
        assert_eq!(s.get_metric(&f, c), Ok(5));
        assert_eq!(s.increment_metric(&f, g, -4), status::OK);
        assert_eq!(s.record_metric(&f, g, 7), status::OK);
        assert_eq!(s.get_metric(&f, g), Ok(7));
        assert_eq!(s.increment_metric(&f, h, 1), status::BAD_ARGUMENT);
        assert_eq!(s.record_metric(&f, h, 10), status::OK);
        assert_eq!(s.get_metric(&f, h), Err(status::BAD_ARGUMENT));
        assert_eq!(s.get_metric(&f, 1000), Err(status::NOT_FOUND));
        // another filter cannot touch f's metrics by id
        let other: Arc<str> = "other".into();
        assert_eq!(s.get_metric(&other, c), Err(status::NOT_FOUND));
    }
}
