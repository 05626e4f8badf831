//! The flow ring: the last `capacity` events (flows and lost-event notices), each with a
//! sequence number, oldest overwritten first. Readers hold sequence numbers, not indexes,
//! so a reader that fell behind learns exactly how many events it missed.
//!
//! One mutex guards the buffer; it is held only to push a batch or to clone `Arc`s out, never
//! across an await. Followers wait on a `watch` channel carrying the next sequence number.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use prost_types::Timestamp;
use tokio::sync::watch;

use crate::proto::flow::{Flow, LostEvent};

/// One ring entry.
#[derive(Clone, Debug)]
pub enum RingEvent {
    Flow(Arc<Flow>),
    /// Events lost before they reached the ring, with the time the loss was noticed.
    Lost(LostEvent, Timestamp),
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub event: RingEvent,
}

/// The result of [`Ring::read`].
#[derive(Debug, Default)]
pub struct Read {
    /// Entries from the requested position (or the oldest one still held).
    pub entries: Vec<Entry>,
    /// How many requested entries were already overwritten.
    pub overwritten: u64,
    /// Where to continue reading.
    pub next: u64,
}

struct Inner {
    buf: VecDeque<Entry>,
    next_seq: u64,
}

pub struct Ring {
    capacity: usize,
    inner: Mutex<Inner>,
    written: watch::Sender<u64>,
}

impl Ring {
    /// A ring holding at most `capacity` (≥ 1) entries.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            inner: Mutex::new(Inner {
                buf: VecDeque::with_capacity(capacity),
                next_seq: 0,
            }),
            written: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Pushing and reading never leave the deque inconsistent, so a poisoned lock (a
        // panic elsewhere while holding it) is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().buf.len()
    }

    /// Appends events, overwriting the oldest, and wakes followers.
    pub fn push(&self, events: impl IntoIterator<Item = RingEvent>) {
        let next = {
            let mut inner = self.lock();
            for event in events {
                if inner.buf.len() == self.capacity {
                    inner.buf.pop_front();
                }
                let seq = inner.next_seq;
                inner.next_seq += 1;
                inner.buf.push_back(Entry { seq, event });
            }
            inner.next_seq
        };
        self.written.send_replace(next);
    }

    /// The sequence number the next pushed event will get.
    #[cfg(test)]
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// All entries currently held, oldest first, and the next sequence number.
    pub fn snapshot(&self) -> (Vec<Entry>, u64) {
        let inner = self.lock();
        (inner.buf.iter().cloned().collect(), inner.next_seq)
    }

    /// Up to `max` entries starting at sequence `from`.
    pub fn read(&self, from: u64, max: usize) -> Read {
        let inner = self.lock();
        let oldest = inner.buf.front().map_or(inner.next_seq, |e| e.seq);
        let start = from.max(oldest);
        let overwritten = start - from;
        // `start - oldest` < buf.len() or the read is empty.
        let offset = usize::try_from(start - oldest).unwrap_or(usize::MAX);
        let entries: Vec<Entry> = inner.buf.iter().skip(offset).take(max).cloned().collect();
        let next = entries.last().map_or(start, |e| e.seq + 1);
        Read {
            entries,
            overwritten,
            next,
        }
    }

    /// A receiver that changes whenever events are pushed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u32) -> RingEvent {
        RingEvent::Flow(Arc::new(Flow {
            drop_reason: n,
            ..Flow::default()
        }))
    }

    fn seqs(read: &Read) -> Vec<u64> {
        read.entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn overwrites_oldest_and_reports_overwritten_reads() {
        let ring = Ring::new(3);
        ring.push((0..5).map(flow));
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.next_seq(), 5);
        let read = ring.read(0, 10);
        assert_eq!(read.overwritten, 2);
        assert_eq!(seqs(&read), [2, 3, 4]);
        assert_eq!(read.next, 5);
        let read = ring.read(3, 1);
        assert_eq!((seqs(&read), read.overwritten, read.next), (vec![3], 0, 4));
        let read = ring.read(5, 10);
        assert!(read.entries.is_empty());
        assert_eq!(read.next, 5);
    }

    #[test]
    fn followers_are_woken() {
        let ring = Ring::new(2);
        let mut rx = ring.subscribe();
        rx.borrow_and_update();
        ring.push([flow(1)]);
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(*rx.borrow_and_update(), 1);
    }
}
