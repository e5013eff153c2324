//! Signals to whole process groups: the one place this crate calls into libc.

use std::io;

/// Sends SIGKILL to every process in the group `pgid`. A group that no longer exists is not an
/// error: killing is how every `execute` ends, whether or not something is left to kill.
pub(crate) fn kill_group(pgid: u32) -> io::Result<()> {
    // 0 and 1 would turn `kill(-pgid)` into "our own group" or "every process we may signal".
    let pgid = match i32::try_from(pgid) {
        Ok(pgid) if pgid > 1 => pgid,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to signal process group {pgid}"),
            ));
        }
    };
    match send(-pgid, libc::SIGKILL) {
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}

/// Whether any process is still in the group `pgid`.
pub(crate) fn group_exists(pgid: u32) -> bool {
    match i32::try_from(pgid) {
        // Signal 0 checks for existence and permission without sending anything; EPERM means
        // the group exists but is not ours to signal.
        Ok(pgid) if pgid > 1 => !matches!(send(-pgid, 0), Err(err) if err.raw_os_error() == Some(libc::ESRCH)),
        _ => false,
    }
}

#[allow(unsafe_code)]
fn send(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of ours; every pid/signal pair is
    // sound to pass (the kernel validates them and reports errors through errno).
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
