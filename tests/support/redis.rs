//! Debian's real `redis-server` and `redis-sentinel`, started by a test on loopback in a
//! temp dir of their own, killed on drop: plain, over TLS (a CA made at test time), with
//! `requirepass` and ACL users, as a replica, and a sentinel watching a master.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use super::process::free_addr;
use super::tls::{Ca, PemFile};

/// How a [`RedisServer`] is started.
#[derive(Default)]
pub struct RedisOptions {
    /// Serve TLS only, with a certificate for 127.0.0.1 from this CA.
    pub tls: Option<(PemFile, PemFile, String)>,
    /// `requirepass` for the default user, which the test's own connections use.
    pub requirepass: Option<String>,
    /// Extra ACL users, as `user` directives: `"iamproxy on >secret ~* &* +@all"`.
    pub users: Vec<String>,
    /// `replicaof 127.0.0.1 <port>`.
    pub replica_of: Option<u16>,
}

impl RedisOptions {
    pub fn tls(mut self, ca: &Ca) -> RedisOptions {
        let (certificate, key) = ca.leaf(&["127.0.0.1"]).files();
        self.tls = Some((certificate, key, ca.file.toml()));
        self
    }
}

/// A `redis-server` (or `redis-sentinel`) on a loopback port.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    sentinel: bool,
    dir: TempDir,
    child: Option<Child>,
    /// For the test's own connections.
    admin_url: String,
    ca_pem: Option<Vec<u8>>,
    _tls_files: Option<(PemFile, PemFile)>,
}

impl RedisServer {
    /// A plain `redis-server`, no persistence.
    pub async fn start(port: u16) -> RedisServer {
        RedisServer::with(port, RedisOptions::default()).await
    }

    pub async fn with(port: u16, options: RedisOptions) -> RedisServer {
        let dir = TempDir::new("redis");
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        args.extend(["--dir".into(), dir.path()]);
        let scheme = match &options.tls {
            Some((certificate, key, ca)) => {
                args.extend([
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.to_string(),
                ]);
                args.extend(["--tls-cert-file".into(), certificate.toml()]);
                args.extend(["--tls-key-file".into(), key.toml()]);
                args.extend(["--tls-ca-cert-file".into(), ca.clone()]);
                args.extend(["--tls-auth-clients".into(), "no".into()]);
                if options.replica_of.is_some() {
                    args.extend(["--tls-replication".into(), "yes".into()]);
                }
                "rediss"
            }
            None => {
                args.extend(["--port".into(), port.to_string()]);
                "redis"
            }
        };
        if let Some(password) = &options.requirepass {
            args.extend(["--requirepass".into(), password.clone()]);
            args.extend(["--masterauth".into(), password.clone()]);
        }
        for user in &options.users {
            // One argument per word: redis-server joins them into the directive.
            args.push("--user".into());
            args.extend(user.split_whitespace().map(String::from));
        }
        if let Some(master) = options.replica_of {
            args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
        }
        let auth = options
            .requirepass
            .as_ref()
            .map_or_else(String::new, |password| format!(":{password}@"));
        let ca_pem = options
            .tls
            .as_ref()
            .map(|(_, _, ca)| std::fs::read(ca).unwrap());
        // The files must outlive the server: they are read again on restart.
        let tls_files = options.tls.map(|(certificate, key, _)| (certificate, key));
        let mut server = RedisServer {
            port,
            args,
            sentinel: false,
            dir,
            child: None,
            admin_url: format!("{scheme}://{auth}127.0.0.1:{port}/"),
            ca_pem,
            _tls_files: tls_files,
        };
        server.restart().await;
        server
    }

    /// A `redis-sentinel` watching `master` (a plain server on loopback) under `name`,
    /// quick to fail over: the master is down after 500 ms without an answer.
    pub async fn sentinel(port: u16, name: &str, master: &RedisServer) -> RedisServer {
        let dir = TempDir::new("sentinel");
        let conf = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {name} 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds {name} 500\n\
             sentinel failover-timeout {name} 3000\n\
             sentinel parallel-syncs {name} 1\n",
            dir = dir.path(),
            master = master.port,
        );
        let file = dir.0.join("sentinel.conf");
        std::fs::write(&file, conf).unwrap();
        let mut server = RedisServer {
            port,
            args: vec![file.display().to_string()],
            sentinel: true,
            dir,
            child: None,
            admin_url: format!("redis://127.0.0.1:{port}/"),
            ca_pem: None,
            _tls_files: None,
        };
        server.restart().await;
        server
    }

    /// Starts it (again, on the same port, with the same settings) and waits until it
    /// answers.
    pub async fn restart(&mut self) {
        self.kill();
        let program = if self.sentinel {
            "redis-sentinel"
        } else {
            "redis-server"
        };
        let child = Command::new(program)
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(std::fs::File::create(self.dir.0.join("server.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} is installed (scripts/test.sh installs it): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(error) = self.try_connection().await {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.0.join("server.log"));
                panic!(
                    "{program} did not start: {error}\n{}",
                    log.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `redis://127.0.0.1:<port>/` (or `rediss://`, with the `requirepass` password).
    pub fn url(&self) -> String {
        self.admin_url.clone()
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn try_connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let client = match &self.ca_pem {
            Some(ca) => redis::Client::build_with_tls(
                self.admin_url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )?,
            None => redis::Client::open(self.admin_url.as_str())?,
        };
        let connect = client.get_multiplexed_async_connection();
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(connection) => connection,
            Err(_) => Err(std::io::Error::other("connect timed out").into()),
        }
    }

    pub async fn connection(&self) -> MultiplexedConnection {
        self.try_connection().await.expect("connect to redis")
    }

    /// Runs one command as the default user.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command
            .query_async(&mut self.connection().await)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The keys matching `pattern`, sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.cmd(&["KEYS", pattern]).await;
        keys.sort();
        keys
    }

    /// Stops answering without closing anything (`SIGSTOP`), as a hung server does.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("running");
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server would otherwise keep its port until the kill lands.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill();
    }
}

/// A master, a replica and a sentinel watching them, on loopback.
pub struct SentinelSetup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel: RedisServer,
    pub name: &'static str,
}

impl SentinelSetup {
    pub async fn start() -> SentinelSetup {
        let name = "gitlab-redis";
        let master = RedisServer::start(free_addr().port()).await;
        let replica = RedisServer::with(
            free_addr().port(),
            RedisOptions {
                replica_of: Some(master.port),
                ..RedisOptions::default()
            },
        )
        .await;
        let sentinel = RedisServer::sentinel(free_addr().port(), name, &master).await;
        let setup = SentinelSetup {
            master,
            replica,
            sentinel,
            name,
        };
        // The sentinel learns of the replica from the master's INFO: failing over needs it.
        super::until(
            Duration::from_secs(20),
            "the sentinel knows the replica",
            || async {
                let replicas: Vec<redis::Value> =
                    setup.sentinel.cmd(&["SENTINEL", "REPLICAS", name]).await;
                let linked: String = setup.replica.cmd(&["INFO", "replication"]).await;
                !replicas.is_empty() && linked.contains("master_link_status:up")
            },
        )
        .await;
        setup
    }

    /// The port the sentinel names as master now.
    pub async fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = self
            .sentinel
            .cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name])
            .await;
        port
    }
}

/// A directory under the temp dir, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(kind: &str) -> TempDir {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "iamproxy-{kind}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
