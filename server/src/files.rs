//! Small file helpers for the data directory: crash-safe writes of small
//! files, the data directory's exclusive lock, and free-space queries.
//!
//! Every file irisd writes is made durable the same way: a fresh temporary
//! file (created exclusively, with the final mode, never a reused one that
//! could keep an older mode), written and synced, renamed over the target,
//! and the directory synced so the new entry survives a power loss.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files only irisd may read (keys, logs).
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of files clients may read (the self-signed certificate).
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Mode of the directories irisd creates: the logs in them hold who talks to
/// whom, so nobody but irisd's user may list or open them.
pub const PRIVATE_DIRECTORY_MODE: u32 = 0o700;

/// Writes `bytes` to `path` readable by the owner only (mode 0600).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably(path, bytes, PRIVATE_FILE_MODE)
}

/// Writes a non-secret file (mode 0644) the same way.
pub fn write_public(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably(path, bytes, PUBLIC_FILE_MODE)
}

/// The temporary name `write_durably` uses for `path`: in the same directory
/// (so the rename is atomic), hidden, and never a name irisd reads.
fn temporary_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let temporary = temporary_path(path);
    // A leftover from a crash may have any mode and content: start afresh.
    match std::fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&temporary)?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    sync_directory(parent_of(path))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// fsyncs a directory so entries created or renamed in it are durable.
pub fn sync_directory(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Creates `path` and any missing parents with mode 0700, syncing each
/// parent of a newly created directory.
pub fn create_private_directory(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        create_private_directory(parent)?;
    }
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(PRIVATE_DIRECTORY_MODE).create(path) {
        Ok(()) => sync_directory(parent_of(path)),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(error) => Err(error),
    }
}

/// Creates the data directory if needed and returns its absolute, canonical
/// path. Everything below runs on absolute paths: glommio opens directories
/// with `openat(-1, ...)`, which fails with EBADF for a relative path, so a
/// relative data directory once made the first write of every segment fail.
pub fn prepare_data_dir(path: &Path) -> std::io::Result<PathBuf> {
    create_private_directory(path)?;
    std::fs::canonicalize(path)
}

/// Reads a 32-byte secret from `path`, creating it (random, mode 0600) if it
/// does not exist and `create` is set. Returns the secret and whether it was created.
pub fn load_or_create_secret(path: &Path, create: bool) -> std::io::Result<([u8; 32], bool)> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let secret: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 32-byte secret"))?;
            Ok((secret, false))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
            if let Some(parent) = path.parent() {
                create_private_directory(parent)?;
            }
            write_private(path, &secret)?;
            Ok((secret, true))
        }
        Err(error) => Err(error),
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statvfs is plain old data, so all zeros is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and outlives the call; stat is a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Why the data directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "data directory {dir} is in use by another irisd ({holder}); two servers on one data directory \
         would corrupt its logs. Stop the other one, or use another --data-dir"
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// What the holder wrote into the lock file (its pid and start time).
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("locking data directory {dir}: {source}")]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An exclusive `flock` on `<data-dir>/lock`, held for the life of the
/// process (the kernel releases it when the process dies, however it dies).
/// The file names the holder for the message a second start prints.
#[derive(Debug)]
pub struct DataDirLock {
    /// The locked file; closing it releases the lock.
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock or says who holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        let io = |source| LockError::Io { dir: data_dir.to_path_buf(), source };
        let path = data_dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a valid, owned descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim().to_string();
                let holder = if holder.is_empty() { "holder unknown".to_string() } else { holder };
                return Err(LockError::Held { dir: data_dir.to_path_buf(), holder });
            }
            return Err(io(error));
        }
        let started_s =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "pid {} started at unix time {started_s}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_temporary_file_never_lends_its_mode_to_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let stale = temporary_path(&path);
        std::fs::write(&stale, b"old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_private(&path, b"new secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, PRIVATE_FILE_MODE, "the secret must be owner-only");
        assert_eq!(std::fs::read(&path).unwrap(), b"new secret");
        assert!(!stale.exists());
    }

    #[test]
    fn a_second_lock_on_one_directory_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let error = DataDirLock::acquire(dir.path()).unwrap_err();
        let text = error.to_string();
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn a_relative_data_directory_becomes_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let prepared = prepare_data_dir(&nested).unwrap();
        assert!(prepared.is_absolute());
        let mode = std::fs::metadata(&prepared).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, PRIVATE_DIRECTORY_MODE);
    }
}
