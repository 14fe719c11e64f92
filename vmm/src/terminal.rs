//! Raw mode for a terminal on stdin while the guest owns the console.

/// Puts a tty into raw mode and restores it on drop; does nothing for
/// non-tty input (pipes, files).
pub struct RawMode {
    fd: i32,
    saved: Option<libc::termios>,
}

impl RawMode {
    /// Enter raw mode on `fd` if it is a terminal.
    pub fn enter(fd: i32) -> Self {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { fd, saved: None };
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Self { fd, saved: None };
        }
        let saved = t;
        // SAFETY: `t` is a valid termios obtained from tcgetattr.
        unsafe { libc::cfmakeraw(&mut t) };
        // Keep output processing so guest "\n" still renders sensibly, and
        // keep ISIG off so Ctrl-C goes to the guest (like Firecracker).
        t.c_oflag |= libc::OPOST;
        // SAFETY: `t` is a valid termios.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        Self {
            fd,
            saved: Some(saved),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restoring the attributes read in `enter`.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, t) };
        }
    }
}
