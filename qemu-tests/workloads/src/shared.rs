//! The crate's only unsafe code: memory shared between processes (SysV
//! shared memory segments and `MAP_SHARED` mappings of files) and SysV
//! semaphores, behind a small safe API.
//!
//! A [`SharedRegion`] is never handed out as a Rust reference or slice:
//! another process writes it at any time, so every access is an atomic load
//! or store of one word ([`SharedRegion::get`], [`SharedRegion::set`]) or of
//! single bytes ([`SharedRegion::bytes`], [`SharedRegion::write_bytes`]).
#![warn(clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use libc::{c_int, c_void};

fn check(r: c_int) -> io::Result<c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Attached with shmat: detached with shmdt.
    Sysv,
    /// Mapped with mmap: unmapped with munmap.
    Mmap,
}

/// Memory shared with other processes: a SysV segment attached with shmat
/// or a file mapped `MAP_SHARED`, read and written only atomically. Dropping
/// it detaches or unmaps it (a SysV segment itself stays, not marked for
/// removal, unless [`SharedRegion::sysv_remove`] is called).
#[derive(Debug)]
pub struct SharedRegion {
    ptr: NonNull<u8>,
    len: usize,
    kind: Kind,
}

impl SharedRegion {
    /// Creates a private SysV segment of `len` bytes (zero-filled) and
    /// attaches it: `(shmid, region)`.
    pub fn sysv_create(len: usize) -> io::Result<(i32, SharedRegion)> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: shmget takes no pointers.
        let id = check(unsafe {
            libc::shmget(
                libc::IPC_PRIVATE,
                len,
                libc::IPC_CREAT | libc::IPC_EXCL | 0o600,
            )
        })?;
        Ok((id, SharedRegion::sysv_attach(id)?))
    }

    /// Attaches an existing SysV segment, all of it.
    pub fn sysv_attach(shmid: i32) -> io::Result<SharedRegion> {
        // SAFETY: shmid_ds is plain data; all zeroes is a valid value.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes one shmid_ds into `ds`, which lives
        // across the call.
        check(unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) })?;
        let len = ds.shm_segsz;
        // SAFETY: a null address lets the kernel choose where to attach;
        // nothing else in this process is at the address it returns.
        let p = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("shmat gave NULL"))?;
        Ok(SharedRegion {
            ptr,
            len,
            kind: Kind::Sysv,
        })
    }

    /// Marks a SysV segment for removal once the last process detaches.
    pub fn sysv_remove(shmid: i32) -> io::Result<()> {
        // SAFETY: IPC_RMID reads no buffer; a null one is allowed.
        check(unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) })?;
        Ok(())
    }

    /// Maps the first `len` bytes of a file (a regular file, a /dev/shm
    /// object, a memfd) `MAP_SHARED`, read-write. The file must be open for
    /// reading and writing and at least `len` long; it may be closed after.
    pub fn map_file(f: &File, len: usize) -> io::Result<SharedRegion> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        if f.metadata()?.len() < len as u64 {
            // Touching a page past the end of the file would be SIGBUS.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "file shorter than the mapping",
            ));
        }
        // SAFETY: a null address lets the kernel choose a fresh range, so
        // no existing memory of this process is replaced; the descriptor is
        // valid for the duration of the call (the mapping holds the file
        // after it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(SharedRegion {
            ptr,
            len,
            kind: Kind::Mmap,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many 8-byte slots fit.
    pub fn slots(&self) -> usize {
        self.len / 8
    }

    fn word(&self, slot: usize) -> &AtomicU64 {
        assert!(
            slot < self.slots(),
            "slot {slot} out of {} in a shared region",
            self.slots()
        );
        // SAFETY: the slot lies inside the region (checked above), which
        // stays mapped as long as `self` lives; the region starts on a page
        // boundary, so `slot * 8` is 8-byte aligned; the memory is only
        // ever accessed atomically, in this process and (by contract) in
        // the others sharing it.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(slot * 8).cast::<u64>()) }
    }

    fn byte(&self, off: usize) -> &AtomicU8 {
        assert!(
            off < self.len,
            "byte {off} out of {} in a shared region",
            self.len
        );
        // SAFETY: the byte lies inside the region (checked above), which
        // stays mapped as long as `self` lives; AtomicU8 needs no
        // alignment; the memory is only ever accessed atomically.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(off)) }
    }

    /// The 64-bit word at byte offset `slot * 8` (native endianness).
    /// Panics when the slot is outside the region.
    pub fn get(&self, slot: usize) -> u64 {
        self.word(slot).load(Ordering::SeqCst)
    }

    pub fn set(&self, slot: usize, v: u64) {
        self.word(slot).store(v, Ordering::SeqCst)
    }

    /// A copy of `len` bytes from `off`. Panics when they are not all
    /// inside the region.
    pub fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        (off..off + len)
            .map(|i| self.byte(i).load(Ordering::Relaxed))
            .collect()
    }

    /// Writes `data` at `off`. Panics when it does not fit.
    pub fn write_bytes(&self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.byte(off + i).store(*b, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        let p = self.ptr.as_ptr().cast::<c_void>();
        // SAFETY: `p` and `len` are exactly what shmat or mmap returned and
        // were given; nothing borrowed from the region outlives `self`.
        unsafe {
            match self.kind {
                Kind::Sysv => libc::shmdt(p),
                Kind::Mmap => libc::munmap(p, self.len),
            };
        }
    }
}

/// `union semun` of semctl(2), which libc leaves to the caller.
#[repr(C)]
union Semun {
    val: c_int,
    _ptr: *mut c_void,
}

/// One SysV semaphore (a set of one), used as a mutex: [`SysvSem::lock`]
/// is semop -1 and [`SysvSem::unlock`] +1, without SEM_UNDO.
#[derive(Debug)]
pub struct SysvSem {
    id: c_int,
}

impl SysvSem {
    /// Creates a private set of one semaphore, with value 1 (unlocked).
    pub fn create() -> io::Result<SysvSem> {
        // SAFETY: semget takes no pointers.
        let id = check(unsafe { libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | 0o600) })?;
        let arg = Semun { val: 1 };
        // SAFETY: SETVAL reads the `val` of the union semun passed by value
        // as the fourth argument, as semctl(2) asks.
        check(unsafe { libc::semctl(id, 0, libc::SETVAL, arg) })?;
        Ok(SysvSem { id })
    }

    /// Opens an existing set by id.
    pub fn open(semid: i32) -> io::Result<SysvSem> {
        let s = SysvSem { id: semid };
        s.value()?;
        Ok(s)
    }

    pub fn id(&self) -> i32 {
        self.id
    }

    /// The semaphore's value: 1 unlocked, 0 locked.
    pub fn value(&self) -> io::Result<i32> {
        // SAFETY: GETVAL takes no fourth argument.
        check(unsafe { libc::semctl(self.id, 0, libc::GETVAL) })
    }

    fn op(&self, delta: i16) -> io::Result<()> {
        let mut b = libc::sembuf {
            sem_num: 0,
            sem_op: delta,
            sem_flg: 0,
        };
        loop {
            // SAFETY: semop reads one sembuf from `b`, which lives across
            // the call.
            match check(unsafe { libc::semop(self.id, &mut b, 1) }) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(|_| ()),
            }
        }
    }

    /// Waits for the semaphore and takes it (semop -1).
    pub fn lock(&self) -> io::Result<()> {
        self.op(-1)
    }

    /// Gives it back (semop +1).
    pub fn unlock(&self) -> io::Result<()> {
        self.op(1)
    }

    /// Removes the set at once (for tests; the workload leaves it to the
    /// IPC namespace).
    pub fn remove(self) -> io::Result<()> {
        // SAFETY: IPC_RMID takes no fourth argument.
        check(unsafe { libc::semctl(self.id, 0, libc::IPC_RMID) })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sysv_region_is_shared_between_attachments() {
        let (id, a) = SharedRegion::sysv_create(4096 + 100).expect("shmget");
        let b = SharedRegion::sysv_attach(id).expect("shmat");
        SharedRegion::sysv_remove(id).expect("IPC_RMID");
        assert_eq!(b.len(), 4196);
        assert_eq!(a.get(3), 0, "a new segment is zero-filled");
        a.set(3, 0xdead_beef_0123_4567);
        assert_eq!(b.get(3), 0xdead_beef_0123_4567);
        b.write_bytes(4096, b"pattern");
        assert_eq!(a.bytes(4096, 7), b"pattern");
        assert!(std::panic::catch_unwind(|| a.get(a.slots())).is_err());
        assert!(std::panic::catch_unwind(|| a.bytes(4190, 7)).is_err());
        drop(a);
        assert_eq!(b.get(3), 0xdead_beef_0123_4567, "b outlives a");
    }

    #[test]
    fn file_mapping_writes_reach_the_file() {
        let path = std::env::temp_dir().join(format!("wl-shared-test-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        f.write_all(&[0u8; 64]).expect("write");
        assert!(SharedRegion::map_file(&f, 65).is_err(), "past the end");
        let r = SharedRegion::map_file(&f, 64).expect("mmap");
        drop(f);
        r.set(1, 7);
        r.write_bytes(16, b"xyz");
        let on_disk = std::fs::read(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        assert_eq!(on_disk[8..16], 7u64.to_ne_bytes());
        assert_eq!(&on_disk[16..19], b"xyz");
    }

    #[test]
    fn semaphore_locks_and_unlocks() {
        let s = SysvSem::create().expect("semget");
        assert_eq!(s.value().expect("GETVAL"), 1);
        s.lock().expect("lock");
        let t = SysvSem::open(s.id()).expect("open");
        assert_eq!(t.value().expect("GETVAL"), 0);
        t.unlock().expect("unlock");
        assert_eq!(s.value().expect("GETVAL"), 1);
        s.remove().expect("IPC_RMID");
        assert!(SysvSem::open(t.id()).is_err(), "removed");
    }
}
