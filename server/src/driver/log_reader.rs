//! The shard's log reader: reads the records of cold mailbox entries back
//! from their segment files (glommio `BufferedFile`, io_uring on the
//! executor's main ring, like the writer), so their bodies can be pushed.
//!
//! One local task per read; the store bounds how many it asks for at once
//! ([`READS_OUTSTANDING_MAX`]), and the completion channel holds that many
//! results. Should it ever be full, a read task waits for room (the loop
//! drains the channel every iteration): a result is never dropped. Segment files are kept open in
//! a small cache (a read of an offline device's backlog walks a few
//! segments in order); the loop drops a segment from it when the segment is
//! deleted, and a read in flight keeps its file open until it completes.

use crate::shard::mailbox::RecordAt;
use crate::storage::layout::segment_path;
use crate::storage::READS_OUTSTANDING_MAX;
use glommio::io::BufferedFile;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Segment files kept open for reads.
const OPEN_FILES_MAX: usize = 16;

/// A finished read.
#[derive(Debug)]
pub struct ReadDone {
    /// What was asked for.
    pub at: RecordAt,
    /// The bytes (possibly fewer than asked for, at the end of a file), or why not.
    pub result: Result<Vec<u8>, String>,
    /// The segment file was not there (deleted after its entries moved):
    /// not a failing disk.
    pub gone: bool,
}

/// Open segment files, the least recently used closed first.
#[derive(Debug, Default)]
struct OpenFiles {
    files: HashMap<u64, (Rc<BufferedFile>, u64)>,
    uses: u64,
}

impl OpenFiles {
    fn get(&mut self, segment: u64) -> Option<Rc<BufferedFile>> {
        self.uses += 1;
        let uses = self.uses;
        self.files.get_mut(&segment).map(|(file, used)| {
            *used = uses;
            Rc::clone(file)
        })
    }

    fn insert(&mut self, segment: u64, file: Rc<BufferedFile>) {
        if self.files.len() >= OPEN_FILES_MAX {
            let oldest = self.files.iter().min_by_key(|(_, (_, used))| *used).map(|(segment, _)| *segment);
            if let Some(oldest) = oldest {
                self.files.remove(&oldest);
            }
        }
        self.uses += 1;
        self.files.insert(segment, (file, self.uses));
    }
}

/// The loop's handle on the reader.
#[derive(Debug)]
pub struct LogReader {
    /// The shard's log directory (absolute).
    dir: PathBuf,
    /// Open segment files, shared with the read tasks.
    files: Rc<RefCell<OpenFiles>>,
    /// Where read tasks report.
    done_sender: flume::Sender<ReadDone>,
    /// Completed reads, for the loop.
    pub done: flume::Receiver<ReadDone>,
}

impl LogReader {
    /// A reader of the segments in `dir`.
    pub fn new(dir: PathBuf) -> LogReader {
        assert!(dir.is_absolute(), "the log reader needs an absolute directory, got {}", dir.display());
        let (done_sender, done) = flume::bounded(READS_OUTSTANDING_MAX);
        LogReader { dir, files: Rc::default(), done_sender, done }
    }

    /// Starts reading `at`; the result arrives on [`LogReader::done`].
    pub fn submit(&self, at: RecordAt) {
        let files = Rc::clone(&self.files);
        let dir = self.dir.clone();
        let done = self.done_sender.clone();
        glommio::spawn_local(async move {
            let (result, gone) = match read(&files, &dir, at).await {
                Ok(bytes) => (Ok(bytes), false),
                Err((error, gone)) => (Err(error), gone),
            };
            // The loop holds the receiver for as long as it runs.
            let _ = done.send_async(ReadDone { at, result, gone }).await;
        })
        .detach();
    }

    /// Closes `segment` if it is open (it is being deleted).
    pub fn forget(&self, segment: u64) {
        self.files.borrow_mut().files.remove(&segment);
    }
}

/// Reads `at`; an error says whether the file was missing.
async fn read(files: &RefCell<OpenFiles>, dir: &Path, at: RecordAt) -> Result<Vec<u8>, (String, bool)> {
    let cached = files.borrow_mut().get(at.segment);
    let file = match cached {
        Some(file) => file,
        None => {
            let path = segment_path(dir, at.segment);
            let file = BufferedFile::open(&path).await.map_err(|error| {
                let gone =
                    matches!(&error, glommio::GlommioError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound);
                (format!("{}: {error}", path.display()), gone)
            })?;
            let file = Rc::new(file);
            files.borrow_mut().insert(at.segment, Rc::clone(&file));
            file
        }
    };
    let bytes = file.read_at(at.offset, at.bytes as usize).await.map_err(|error| (error.to_string(), false))?;
    Ok(bytes.to_vec())
}
