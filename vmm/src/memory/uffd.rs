//! A minimal userfaultfd wrapper (MISSING mode, wake, poison): all of the
//! VMM's userfaultfd syscalls live here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
const UFFD_FEATURE_POISON: u64 = 1 << 14;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;

// ioctl numbers: _IOWR/_IOR(0xAA, nr, struct)
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_POISON: libc::c_ulong = 0xc020_aa08;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

/// Errors of userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The syscall or an ioctl failed.
    #[error("userfaultfd {what} failed: {err}")]
    Os {
        /// Which operation.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
    /// The kernel lacks a feature the VMM needs.
    #[error("userfaultfd lacks {0} (needs Linux 6.6 or newer); the VMM cannot demand-page guest RAM on this host")]
    MissingFeature(&'static str),
}

fn os(what: &'static str) -> UffdError {
    UffdError::Os {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// One page fault read from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host address (page aligned by the kernel unless EXACT_ADDRESS).
    pub addr: u64,
    /// Write access.
    pub write: bool,
    /// Thread id of the faulting thread.
    pub tid: u32,
}

/// A userfaultfd descriptor.
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Open a userfaultfd that reports thread ids and can poison pages.
    pub fn new() -> Result<Self, UffdError> {
        // Faults from the kernel (KVM's get_user_pages) must be reported, so
        // no UFFD_USER_MODE_ONLY. SAFETY: plain syscall with valid flags.
        let mut raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
            // Unprivileged and vm.unprivileged_userfaultfd=0: /dev/userfaultfd
            // (Linux 6.1+) grants the same to whoever may open it.
            raw = open_dev_userfaultfd();
        }
        if raw < 0 {
            return Err(UffdError::Os {
                what: "open (as a non-root user: `sudo sysctl vm.unprivileged_userfaultfd=1`, or give \
                       yourself read/write access to /dev/userfaultfd, or run with --mem-backing anon)",
                err: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the syscall returned a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_POISON,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API with a properly sized, initialized struct.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Err(UffdError::MissingFeature("UFFD_FEATURE_POISON/THREAD_ID"));
            }
            return Err(UffdError::Os {
                what: "API handshake",
                err,
            });
        }
        Ok(Self { fd })
    }

    /// Report missing-page faults in `[start, start + len)`.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER with a properly sized struct; the range is
        // a mapping the caller owns.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(os("register"));
        }
        Ok(())
    }

    /// Stop reporting faults in `[start, start + len)`. The kernel wakes
    /// every fault still waiting there; it retries as an ordinary fault.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let r = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER with a properly sized struct.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &r) } != 0 {
            return Err(os("unregister"));
        }
        Ok(())
    }

    /// Wake threads waiting on faults in the range (after it was resolved).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let r = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE with a properly sized struct.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &r) } != 0 {
            return Err(os("wake"));
        }
        Ok(())
    }

    /// Install poison markers in the range: an access raises SIGBUS
    /// (BUS_MCEERR_AR); KVM turns a guest access into that signal on the
    /// vCPU thread. Wakes the waiters.
    pub fn poison(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut p = UffdioPoison {
            range: UffdioRange { start, len },
            mode: 0,
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON with a properly sized struct on a registered range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON, &mut p) } != 0 {
            let err = std::io::Error::last_os_error();
            // EEXIST: already resolved (e.g. poisoned by a concurrent fault).
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(UffdError::Os {
                    what: "poison",
                    err,
                });
            }
        }
        Ok(())
    }

    /// Read pending faults into `out` (non-blocking); returns how many.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<usize, UffdError> {
        let mut buf = [0u8; 32 * 16];
        // SAFETY: reading into a buffer we own of the stated length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(UffdError::Os { what: "read", err });
        }
        let before = out.len();
        for msg in buf[..n as usize].chunks_exact(32) {
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let flags = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
            let addr = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
            let tid = u32::from_le_bytes(msg[24..28].try_into().expect("4 bytes"));
            out.push(Fault {
                addr,
                write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                tid,
            });
        }
        Ok(out.len() - before)
    }
}

/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd; returns the new fd or -1.
fn open_dev_userfaultfd() -> i64 {
    const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
    let Ok(dev) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    else {
        return -1;
    };
    // SAFETY: the ioctl takes the flags as its argument and returns a new fd.
    i64::from(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
