//! The home folder: identity key (0600), `config.toml`, the sled store, the
//! API token (0600), the API address file of a running node, and the lock
//! that keeps a second node off the same home.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use rand::RngCore;

use crate::config::ConfigFile;
use crate::error::{Error, Result};

const IDENTITY: &str = "identity.key";
const X25519: &str = "x25519.key";
const CONFIG: &str = "config.toml";
const TOKEN: &str = "api-token";
const API_ADDR: &str = "api.addr";
const LOCK: &str = "lock";
const DB: &str = "db";

/// The fewest characters an API token may have. `init` writes 64 hex
/// characters (256 bits); an empty or short token would let any local
/// process in, so neither the home nor the API accepts one.
pub const MIN_API_TOKEN_LEN: usize = 32;

/// Paths inside a home folder.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// A home at `dir` (not checked).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the home has been initialised.
    pub fn exists(&self) -> bool {
        self.dir.join(IDENTITY).exists()
    }

    /// Creates identity, config and token. Fails if an identity exists.
    pub fn init(&self, name: &str) -> Result<()> {
        if self.exists() {
            return Err(Error::Config {
                path: self.dir.join(IDENTITY),
                reason: "this home is already initialised".into(),
            });
        }
        self.identity_or_create()?;
        let mut x = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut x);
        write_private(&self.dir.join(X25519), &x)?;
        let mut token = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut token);
        write_private(&self.dir.join(TOKEN), hex::encode(token).as_bytes())?;
        let cfg = ConfigFile {
            name: name.to_string(),
            ..ConfigFile::default()
        };
        cfg.save(&self.config_path())
    }

    /// Initialises the home if it has no identity yet; true if it did.
    pub fn ensure(&self, default_name: &str) -> Result<bool> {
        if self.exists() {
            return Ok(false);
        }
        self.init(default_name)?;
        Ok(true)
    }

    /// The identity key, created (with a private folder) if the home has
    /// none yet. A relay's home holds nothing else.
    pub fn identity_or_create(&self) -> Result<Keypair> {
        if self.exists() {
            return self.keypair();
        }
        fs::create_dir_all(&self.dir).map_err(|e| Error::io("create", &self.dir, e))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod", &self.dir, e))?;
        let key = Keypair::generate_ed25519();
        let bytes = key
            .to_protobuf_encoding()
            .map_err(|e| Error::Network(format!("encode identity: {e}")))?;
        write_private(&self.dir.join(IDENTITY), &bytes)?;
        Ok(key)
    }

    /// The device key.
    pub fn keypair(&self) -> Result<Keypair> {
        let p = self.dir.join(IDENTITY);
        if !p.exists() {
            return Err(Error::NoHome(self.dir.clone()));
        }
        let bytes = fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
        Keypair::from_protobuf_encoding(&bytes).map_err(|e| Error::Config {
            path: p,
            reason: format!("identity key does not decode: {e}"),
        })
    }

    /// The device's long-term x25519 secret (epoch keys are sealed to its
    /// public half). Created on first use for homes made before it existed.
    pub fn x25519_secret(&self) -> Result<[u8; 32]> {
        let p = self.dir.join(X25519);
        if !p.exists() {
            let mut x = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut x);
            write_private(&p, &x)?;
        }
        let bytes = fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| Error::Config {
            path: p,
            reason: "the x25519 key is not 32 bytes".into(),
        })
    }

    /// Path of `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG)
    }

    /// The parsed config file.
    pub fn config(&self) -> Result<ConfigFile> {
        if !self.exists() {
            return Err(Error::NoHome(self.dir.clone()));
        }
        ConfigFile::load(&self.config_path())
    }

    /// The sled store folder.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB)
    }

    /// The API bearer token; an error if the file holds fewer than
    /// [`MIN_API_TOKEN_LEN`] characters.
    pub fn api_token(&self) -> Result<String> {
        let p = self.dir.join(TOKEN);
        let t = fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?;
        let t = t.trim().to_string();
        if t.chars().count() < MIN_API_TOKEN_LEN {
            return Err(Error::ApiToken(format!(
                "{} is empty or too short ({} characters, at least {MIN_API_TOKEN_LEN}); \
                 replace it with a long random one",
                p.display(),
                t.chars().count()
            )));
        }
        Ok(t)
    }

    /// Path of the file where a running node records its API address.
    pub fn api_addr_path(&self) -> PathBuf {
        self.dir.join(API_ADDR)
    }

    /// Takes the home's lock, or fails with [`Error::Locked`].
    pub fn lock(&self) -> Result<HomeLock> {
        if !self.exists() {
            return Err(Error::NoHome(self.dir.clone()));
        }
        let p = self.dir.join(LOCK);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io("open", &p, e))?;
        match f.try_lock() {
            Ok(()) => Ok(HomeLock { _file: f }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked(self.dir.clone())),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &p, e)),
        }
    }
}

/// Held while a node runs on the home; released on drop.
#[derive(Debug)]
pub struct HomeLock {
    _file: File,
}

/// Writes a file readable by the owner only, atomically: the bytes go to a
/// fresh temporary file in the same folder (created with `O_EXCL |
/// O_NOFOLLOW`, mode 0600), which is fsynced and renamed over `path`. So a
/// link planted at `path` is replaced, not followed, an existing file with
/// a looser mode ends 0600, and a crash leaves the old file or the new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp, mut f) = create_temp(dir, &name)?;
    let written = f
        .write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))
        .and_then(|()| f.sync_all().map_err(|e| Error::io("sync", &tmp, e)))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync", dir, e))
}

/// A new file `.NAME.RANDOM.tmp` in `dir`, never an existing one or a link.
fn create_temp(dir: &Path, name: &str) -> Result<(PathBuf, File)> {
    let mut last = None;
    for _ in 0..8 {
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(Error::io("create", &tmp, e)),
        }
    }
    let (tmp, e) = last.unwrap_or_else(|| {
        (
            dir.to_path_buf(),
            std::io::Error::other("no temporary name"),
        )
    });
    Err(Error::io("create", &tmp, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_private_identity_and_lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(t.path().join("h"));
        assert!(matches!(h.keypair(), Err(Error::NoHome(_))));
        h.init("laptop").unwrap();
        assert!(h.init("again").is_err());
        let mode = fs::metadata(h.dir().join(IDENTITY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(h.config().unwrap().name, "laptop");
        let k1 = h.keypair().unwrap().public().to_peer_id();
        assert_eq!(k1, h.keypair().unwrap().public().to_peer_id());
        let l = h.lock().unwrap();
        assert!(matches!(h.lock(), Err(Error::Locked(_))));
        drop(l);
        assert!(h.lock().is_ok());
    }

    #[test]
    fn write_private_fixes_the_mode_of_an_existing_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("api-token");
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"new").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        assert_eq!(fs::read(&p).unwrap(), b"new");
        // no temporary file is left behind
        let names: Vec<_> = fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn write_private_does_not_follow_a_planted_symlink() {
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        let p = t.path().join("identity.key");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_private(&p, b"secret").unwrap();
        // the link's target is untouched; the path is now a private file
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let m = fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_file(), "{:?}", m.file_type());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"secret");
    }
}
