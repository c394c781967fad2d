//! The upgrade socket's file: created 0600, a stale one (its process gone) replaced, a live one
//! left alone; and who may connect (SO_PEERCRED: the same uid, or root).

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Our socket at its path, to remove it at exit only if it is still ours.
pub struct Bound {
    pub listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl Bound {
    /// Removes the socket file if it is still the one this process bound (a successor may have
    /// put its own there).
    pub fn remove_if_ours(&self) {
        if fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the upgrade socket for a process that starts fresh. A live process already there is
/// an error (take over from it, or use another path); a socket file whose process is gone
/// (connect refused) is replaced; any other file is left alone and is an error.
pub fn bind_fresh(path: &Path) -> Result<Bound, String> {
    let flag = "--upgrade-socket";
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{flag} {}: {e}", path.display())),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!(
                "{flag} {}: exists and is not a socket; remove it or choose another path",
                path.display()
            ))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "{flag} {}: another Ringway is running there; start with --takeover to take \
                     over from it, or choose another path",
                    path.display()
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                log::info!(
                    "{flag} {}: removing a stale socket (nobody listens on it)",
                    path.display()
                );
            }
            Err(e) => return Err(format!("{flag} {}: {e}", path.display())),
        },
    }
    bind_replacing(path)
}

/// Binds a new socket at `path`, replacing whatever socket is there: bound under a temporary
/// name, made 0600, then renamed into place, so the path never names a socket others may use.
pub fn bind_replacing(path: &Path) -> Result<Bound, String> {
    let flag = "--upgrade-socket";
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.new", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)
        .map_err(|e| format!("{flag} {}: cannot create it: {e}", path.display()))?;
    let placed = fs::set_permissions(&temporary, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&temporary);
        return Err(format!("{flag} {}: cannot create it: {e}", path.display()));
    }
    let meta = fs::metadata(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
        inode: (meta.dev(), meta.ino()),
    })
}

/// May a process running as `peer` take over from one running as `own`? The same user, or
/// root: anyone else could take every connection.
pub fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// The uid of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    Ok(creds.uid())
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ringway-upgrade-socket-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir.join("upgrade.sock")
    }

    #[test]
    fn only_the_same_user_or_root_may_take_over() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(65534, 1000));
        assert!(!peer_allowed(1000, 0));
    }

    #[test]
    fn the_socket_is_created_private() {
        let path = temp("private");
        let bound = bind_fresh(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(peer_uid(&UnixStream::connect(&path).unwrap()).ok(), {
            let (s, _) = bound.listener.accept().unwrap();
            peer_uid(&s).ok()
        });
        bound.remove_if_ours();
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
        let path = temp("stale");
        drop(UnixListener::bind(&path).unwrap()); // the file stays, nobody listens
        let bound = bind_fresh(&path).expect("a stale socket is replaced");
        let e = bind_fresh(&path).err().expect("a live one is not");
        assert!(e.contains("--takeover"), "{e}");
        assert!(!e.contains('\n'));
        drop(bound);
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_left_alone() {
        let path = temp("file");
        fs::write(&path, "keep me").unwrap();
        let e = bind_fresh(&path).err().unwrap();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn a_successor_replaces_a_live_socket_and_the_old_one_does_not_remove_it() {
        let path = temp("replace");
        let old = bind_fresh(&path).unwrap();
        let new = bind_replacing(&path).unwrap();
        old.remove_if_ours();
        assert!(
            path.exists(),
            "the old process removed its successor's socket"
        );
        drop(new.listener.try_clone().unwrap());
        new.remove_if_ours();
        assert!(!path.exists());
    }
}
