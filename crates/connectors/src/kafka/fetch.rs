//! Batched reads for the Kafka source: the fetch queues of the partitions a worker owns are
//! forwarded to one queue of its own, which is read many messages at a time with
//! `rd_kafka_consume_batch_queue`. rust-rdkafka reads one message per poll, and each poll takes
//! the queue's lock and reads the clock three times (6% of the worker's CPU on the ride drain,
//! docs/benchmarks.md); a batch does that once. This is the crate's one module with `unsafe`
//! code: librdkafka's C API, through the bindings rust-rdkafka re-exports.
//!
//! Only fetched messages and the partitions' own errors come through this queue. Everything
//! else librdkafka reports (client errors, offset-commit replies) stays on the consumer's queue,
//! which the source still polls: `rd_kafka_consume_batch_queue` is not given the consumer queue
//! itself, because an offset-commit reply there aborts the process ("unhandled optype").
#![allow(unsafe_code)]

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;

/// A consumer with a queue of its own that its partitions' messages are forwarded to. It owns
/// the consumer, so the queue can never outlive the client it belongs to.
pub struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// The batch librdkafka fills.
    batch: Vec<*mut rd::rd_kafka_message_t>,
    /// Declared after `queue`: fields drop in order, so the queue is released before the client.
    consumer: BaseConsumer,
}

// SAFETY: librdkafka's queues may be used from any thread (its documentation says the whole
// library is thread-safe); `batch` only holds pointers between a read's start and its end.
unsafe impl Send for FetchQueue {}

/// One item of a batch: a message, or an error the partition's fetcher reported.
pub enum Fetched<'a> {
    Message(FetchedMessage<'a>),
    Error { code: RDKafkaErrorCode, partition: i32, text: String },
}

/// A message, borrowed from librdkafka until the callback returns.
pub struct FetchedMessage<'a> {
    pub partition: i32,
    pub offset: i64,
    /// `None` for a message without a key.
    pub key: Option<&'a [u8]>,
    /// `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    msg: &'a rd::rd_kafka_message_t,
}

impl FetchedMessage<'_> {
    /// The value of the last header called `name`, if any.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let name = CString::new(name).ok()?;
        let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        // SAFETY: `msg` is a live message of this batch; librdkafka keeps its headers with it.
        let err = unsafe { rd::rd_kafka_message_headers(self.msg, &mut headers) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
            return None;
        }
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `headers` belongs to the message; the value points into it and lives as long.
        let err = unsafe { rd::rd_kafka_header_get_last(headers, name.as_ptr(), &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: as above; a header without a value is an empty slice.
        Some(unsafe { bytes(value, size) }.unwrap_or_default())
    }
}

/// `len` bytes at `ptr`, `None` for a null pointer.
///
/// # Safety
/// `ptr` must be null or valid for `len` bytes for the returned lifetime.
unsafe fn bytes<'a>(ptr: *const c_void, len: usize) -> Option<&'a [u8]> {
    // SAFETY: the caller's promise.
    (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
}

impl FetchQueue {
    /// A queue on `consumer`'s client, which it keeps.
    pub fn new(consumer: BaseConsumer) -> Self {
        // SAFETY: the client pointer is live (we hold the consumer); the new queue is released in
        // `drop`, before the consumer.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        let queue = NonNull::new(queue).expect("librdkafka returns a new queue or aborts on allocation failure");
        FetchQueue { queue, batch: Vec::new(), consumer }
    }

    /// The consumer: assignment, commits, metadata, and its own queue's events.
    pub fn consumer(&self) -> &BaseConsumer {
        &self.consumer
    }

    /// Forwards the messages of `partition` of `topic` to this queue. Called before the partition
    /// is assigned: librdkafka keeps a forward the application set when it starts fetching.
    pub fn take(&self, topic: &str, partition: i32) -> Result<(), String> {
        let name = CString::new(topic).map_err(|_| format!("topic name {topic:?} holds a NUL byte"))?;
        // SAFETY: the client is live; the returned handle is released below.
        let part = unsafe { rd::rd_kafka_queue_get_partition(self.consumer.client().native_ptr(), name.as_ptr(), partition) };
        if part.is_null() {
            return Err(format!("librdkafka has no queue for partition {partition} of {topic}"));
        }
        // SAFETY: both queues are live; the forward holds its own reference to this queue, and
        // the partition's queue stays with its partition once our handle is released.
        unsafe {
            rd::rd_kafka_queue_forward(part, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(part);
        }
        Ok(())
    }

    /// Reads up to `max` messages without waiting and hands each to `f`, in order. Returns how
    /// many items there were.
    pub fn read(&mut self, max: usize, mut f: impl FnMut(Fetched<'_>)) -> usize {
        if max == 0 {
            return 0;
        }
        self.batch.clear();
        self.batch.resize(max, std::ptr::null_mut());
        // SAFETY: `batch` has room for `max` pointers; a timeout of 0 does not wait.
        let n = unsafe { rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, self.batch.as_mut_ptr(), max) };
        let n = usize::try_from(n).unwrap_or(0).min(max);
        // Every message is released, even if `f` panics part-way.
        let mut release = Release { batch: &self.batch[..n], next: 0 };
        while release.next < n {
            let ptr = release.batch[release.next];
            // SAFETY: librdkafka filled the first `n` slots with live messages, released below.
            let msg = unsafe { &*ptr };
            if msg.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                // SAFETY: an error message's text is a NUL-terminated string it owns.
                let text = unsafe { CStr::from_ptr(rd::rd_kafka_message_errstr(msg)) }.to_string_lossy().into_owned();
                f(Fetched::Error { code: RDKafkaErrorCode::from(msg.err), partition: msg.partition, text });
            } else {
                // SAFETY: key and payload are owned by the message, which lives until released.
                let (key, payload) = unsafe { (bytes(msg.key, msg.key_len), bytes(msg.payload, msg.len)) };
                f(Fetched::Message(FetchedMessage { partition: msg.partition, offset: msg.offset, key, payload, msg }));
            }
            release.next += 1;
            // SAFETY: the message is not used after this.
            unsafe { rd::rd_kafka_message_destroy(ptr) };
        }
        n
    }
}

/// Releases the messages of a batch that were not handed out yet (when a callback panics).
struct Release<'a> {
    batch: &'a [*mut rd::rd_kafka_message_t],
    next: usize,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        for &ptr in &self.batch[self.next.min(self.batch.len())..] {
            // SAFETY: these messages were never handed out or released.
            unsafe { rd::rd_kafka_message_destroy(ptr) };
        }
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: our handle, released once; the client is still live (`consumer` drops after).
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}
