//! Log records to the systemd journal with their fields as journal fields.
//!
//! Under systemd a service's stderr already reaches the journal, but as text
//! lines: every record gets the unit's default priority and its fields are
//! words inside MESSAGE. When stderr *is* the journal (systemd sets
//! `JOURNAL_STREAM` to its device and inode), irisd speaks the journal's
//! native protocol instead, so `journalctl -p warning` selects by level and
//! `journalctl CONN_ID=7` by field.
//!
//! The layer formats a record on the thread that logs it and hands it to a
//! bounded channel; one thread of its own sends them (libsystemd's
//! `journal_send`). A shard never waits for journald: past
//! [`RECORDS_BUFFERED_MAX`] waiting records new ones are counted and
//! dropped, and the count is logged once room returns.

use libsystemd::logging::Priority;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Records waiting for the journal thread (a few hundred bytes each).
pub const RECORDS_BUFFERED_MAX: usize = 10_000;
/// Longest wait at exit for the waiting records to be sent.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest field name the journal accepts.
const JOURNAL_KEY_BYTES_MAX: usize = 64;
/// Field names the journal or this layer gives a meaning of their own.
const RESERVED_KEYS: [&str; 9] = [
    "MESSAGE",
    "MESSAGE_ID",
    "PRIORITY",
    "TARGET",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "SYSLOG_IDENTIFIER",
    "ERRNO",
];
/// The journal's SYSLOG_IDENTIFIER for irisd's records.
const IDENTIFIER: &str = "irisd";

/// Whether this process's stderr is connected to the journal.
pub fn stderr_is_journal() -> bool {
    libsystemd::logging::connected_to_journal()
}

/// One formatted record on its way to the journal.
#[derive(Debug)]
struct Entry {
    priority: Priority,
    message: String,
    fields: Vec<(String, String)>,
}

#[derive(Debug)]
enum Item {
    Entry(Entry),
    /// Answered once every earlier entry has been sent.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// A `tracing` layer that sends records to the journal thread.
#[derive(Debug)]
pub struct JournalLayer {
    sender: flume::Sender<Item>,
    dropped: Arc<AtomicU64>,
}

/// Keeps the journal thread; dropping it sends what is waiting (bounded).
#[derive(Debug)]
pub struct JournalGuard {
    sender: flume::Sender<Item>,
}

impl Drop for JournalGuard {
    fn drop(&mut self) {
        // One deadline for both waits: the exit is delayed by at most
        // FLUSH_TIMEOUT however stuck the journal is.
        let deadline = std::time::Instant::now() + FLUSH_TIMEOUT;
        let (done, flushed) = std::sync::mpsc::sync_channel(1);
        if self.sender.send_deadline(Item::Flush(done), deadline).is_ok() {
            let _ = flushed.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        }
    }
}

/// Starts the journal thread; returns the layer and the guard to keep.
pub fn layer() -> std::io::Result<(JournalLayer, JournalGuard)> {
    let (sender, receiver) = flume::bounded(RECORDS_BUFFERED_MAX);
    let dropped = Arc::new(AtomicU64::new(0));
    let thread_dropped = dropped.clone();
    std::thread::Builder::new().name("irisd-journal".into()).spawn(move || send_loop(&receiver, &thread_dropped))?;
    Ok((JournalLayer { sender: sender.clone(), dropped }, JournalGuard { sender }))
}

fn send_loop(receiver: &flume::Receiver<Item>, dropped: &AtomicU64) {
    let mut failing = false;
    for item in receiver.iter() {
        match item {
            Item::Entry(entry) => {
                send(&entry, &mut failing);
                report_dropped(dropped, &mut failing);
            }
            Item::Flush(done) => {
                report_dropped(dropped, &mut failing);
                let _ = done.try_send(());
            }
        }
    }
}

/// Says how many records were dropped since the last report, if any (after
/// the entries that were queued before them).
fn report_dropped(dropped: &AtomicU64, failing: &mut bool) {
    let lost = dropped.swap(0, Ordering::Relaxed);
    if lost > 0 {
        let entry = Entry {
            priority: Priority::Warning,
            message: format!("{lost} log records dropped: the journal fell behind"),
            fields: vec![("DROPPED_RECORDS".into(), lost.to_string())],
        };
        send(&entry, failing);
    }
}

/// Sends one entry; the first failure of a run of them is reported on stderr.
fn send(entry: &Entry, failing: &mut bool) {
    let fields = entry
        .fields
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .chain(std::iter::once(("SYSLOG_IDENTIFIER", IDENTIFIER)));
    match libsystemd::logging::journal_send(entry.priority, &entry.message, fields) {
        Ok(()) => *failing = false,
        Err(error) => {
            if !*failing {
                eprintln!("irisd: cannot write to the journal ({error}); records are lost until it returns");
            }
            *failing = true;
        }
    }
}

/// A recorded field: its journal key, its name in the code, its value.
#[derive(Clone)]
struct Recorded {
    key: String,
    name: &'static str,
    value: String,
}

/// A span's fields, kept in the span's extensions.
struct SpanFields(Vec<Recorded>);

impl<S> Layer<S> for JournalLayer
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let Some(span) = context.span(id) else { return };
        let mut visitor = FieldVisitor::new(span.name());
        attributes.record(&mut visitor);
        span.extensions_mut().insert(SpanFields(visitor.fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        let Some(span) = context.span(id) else { return };
        let mut visitor = FieldVisitor::new(span.name());
        values.record(&mut visitor);
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<SpanFields>() {
            // A field recorded again replaces its value.
            Some(fields) => {
                for field in visitor.fields {
                    match fields.0.iter_mut().find(|old| old.key == field.key) {
                        Some(old) => *old = field,
                        None => fields.0.push(field),
                    }
                }
            }
            None => extensions.insert(SpanFields(visitor.fields)),
        }
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let metadata = event.metadata();
        let mut visitor = FieldVisitor::new("");
        event.record(&mut visitor);
        // MESSAGE reads like the text log: spans, message, fields.
        let mut message = String::new();
        let mut fields = Vec::new();
        if let Some(scope) = context.event_scope(event) {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let span_fields = extensions.get::<SpanFields>().map_or(&[][..], |fields| &fields.0[..]);
                let _ = write!(message, "{}{{", span.name());
                for (index, field) in span_fields.iter().enumerate() {
                    let _ = write!(message, "{}{}={}", if index == 0 { "" } else { " " }, field.name, field.value);
                }
                message.push_str("}: ");
                fields.extend(span_fields.iter().map(|field| (field.key.clone(), field.value.clone())));
            }
        }
        message.push_str(&visitor.message);
        for field in &visitor.fields {
            let _ = write!(message, " {}={}", field.name, field.value);
        }
        fields.extend(visitor.fields.into_iter().map(|field| (field.key, field.value)));
        let origin = visitor.origin;
        fields.push(("TARGET".into(), origin.target.unwrap_or_else(|| metadata.target().into())));
        if let Some(file) = origin.file.or_else(|| metadata.file().map(Into::into)) {
            fields.push(("CODE_FILE".into(), file));
        }
        if let Some(line) = origin.line.or_else(|| metadata.line().map(|line| line.to_string())) {
            fields.push(("CODE_LINE".into(), line));
        }
        let entry = Entry { priority: priority(*metadata.level()), message, fields };
        if self.sender.try_send(Item::Entry(entry)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn priority(level: Level) -> Priority {
    match level {
        Level::ERROR => Priority::Error,
        Level::WARN => Priority::Warning,
        Level::INFO => Priority::Info,
        Level::DEBUG | Level::TRACE => Priority::Debug,
    }
}

/// Collects a record's message and its other fields, named as journal
/// fields: upper case, `[A-Z0-9_]`, prefixed with the span's name if any.
struct FieldVisitor {
    prefix: String,
    message: String,
    fields: Vec<Recorded>,
    origin: Origin,
}

/// Where a record from the `log` crate was logged.
#[derive(Default)]
struct Origin {
    target: Option<String>,
    file: Option<String>,
    line: Option<String>,
}

impl FieldVisitor {
    fn new(span: &str) -> Self {
        Self { prefix: journal_key(span), message: String::new(), fields: Vec::new(), origin: Origin::default() }
    }

    fn push(&mut self, field: &Field, value: String) {
        // A record from the `log` crate (rustls, quinn) carries its origin
        // as fields; they become TARGET, CODE_FILE and CODE_LINE.
        match field.name() {
            "log.target" => return self.origin.target = Some(value),
            "log.file" => return self.origin.file = Some(value),
            "log.line" => return self.origin.line = Some(value),
            "log.module_path" => return,
            _ => {}
        }
        let name = journal_key(field.name());
        let mut key = if self.prefix.is_empty() { name } else { format!("{}_{name}", self.prefix) };
        // The journal's own fields and the ones this layer sets are not
        // taken by a record's field of the same name.
        if RESERVED_KEYS.contains(&key.as_str()) {
            key.insert_str(0, "FIELD_");
        }
        key.truncate(JOURNAL_KEY_BYTES_MAX);
        self.fields.push(Recorded { key, name: field.name(), value });
    }
}

impl Visit for FieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.push(field, value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.push(field, format!("{value:?}"));
        }
    }
}

/// A field name as the journal accepts it: ASCII upper case letters, digits
/// and underscores, not starting with an underscore or a digit (those are
/// the journal's own), at most 64 bytes.
fn journal_key(name: &str) -> String {
    let mut key: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .skip_while(|c| *c == '_' || c.is_ascii_digit())
        .take(JOURNAL_KEY_BYTES_MAX)
        .collect();
    if key.is_empty() && !name.is_empty() {
        key.push_str("FIELD");
    }
    key
}

#[cfg(test)]
mod tests {
    use super::journal_key;

    #[test]
    fn field_names_become_valid_journal_keys() {
        assert_eq!(journal_key("conn"), "CONN");
        assert_eq!(journal_key("peer.addr"), "PEER_ADDR");
        assert_eq!(journal_key("_private"), "PRIVATE");
        assert_eq!(journal_key("2fa"), "FA");
        assert_eq!(journal_key("__"), "FIELD");
        assert_eq!(journal_key(&"x".repeat(100)).len(), 64);
    }

    #[test]
    fn a_records_fields_never_take_the_journals_own_names_or_exceed_their_length() {
        use tracing::field::Visit;
        let callsite = tracing::callsite::Identifier(&CALLSITE);
        let fields = tracing::field::FieldSet::new(&["priority", "target", "long_name_of_a_field_in_a_span"], callsite);
        let mut visitor = super::FieldVisitor::new("a_span_with_a_name_long_enough_to_push_the_key_past_the_limit");
        let mut plain = super::FieldVisitor::new("");
        for field in fields.iter() {
            visitor.record_str(&field, "x");
            plain.record_str(&field, "y");
        }
        let keys: Vec<&str> = plain.fields.iter().map(|field| field.key.as_str()).collect();
        assert_eq!(keys, ["FIELD_PRIORITY", "FIELD_TARGET", "LONG_NAME_OF_A_FIELD_IN_A_SPAN"]);
        assert!(visitor.fields.iter().all(|field| field.key.len() <= 64), "{:?}", visitor.fields[2].key);
    }

    struct Callsite;
    static CALLSITE: Callsite = Callsite;
    impl tracing::callsite::Callsite for Callsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &tracing::Metadata<'_> {
            panic!("the test records fields only; it never asks for metadata")
        }
    }
}
