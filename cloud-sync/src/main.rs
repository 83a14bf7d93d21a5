//! `outpost-cloud`: the fleet service (MQTT ingest, store, HTTP API), with an embedded broker
//! by default and an optional demo agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use outpost_cloud_sync::access::{Access, AccessOptions, ProxyAuth, RoleMap};
use outpost_cloud_sync::operators::admin::AdminRequest;
use outpost_cloud_sync::pki::{Keyring, Pki};
use outpost_cloud_sync::{Link, Security, Service, Store, api};
use outpost_shared::protocol::CommandKind;
use outpost_shared::tls::TlsFiles;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "outpost-cloud",
    version,
    about = "Outpost cloud-sync: the fleet's state, run histories, deployments, commands",
    long_about = "Outpost cloud-sync receives every event of every gateway over MQTT, stores it, and serves the \
fleet's state over an HTTP JSON API. With no --broker it starts an embedded MQTT broker on --mqtt-listen, so \
nothing needs installing; in production point it at Mosquitto or another broker.\n\n\
Secure by default: on first start it makes the fleet PKI in DATA_DIR/pki (CA, broker and service \
certificates, the fleet signing key); the embedded broker takes only TLS clients with a certificate from that \
CA, and every message is signed end to end. Enrol a gateway with `outpost keygen` there and `outpost-cloud pki \
sign` here.\n\n\
Try it: outpost-cloud --demo (starts an enrolled demo gateway running the oven example against this service)."
)]
struct Cli {
    /// Where the store (cloud.redb) lives.
    #[arg(long, global = true, env = "OUTPOST_CLOUD_DATA_DIR", default_value = "cloud-data")]
    data_dir: PathBuf,
    /// The store: a `postgres://USER@HOST:PORT/DB` URL, shared by every replica of a scaled-out
    /// fleet service (docs/scale-out.md) [default: the redb file DATA_DIR/cloud.redb].
    #[arg(long, global = true, env = "OUTPOST_CLOUD_STORE", value_name = "URL")]
    store: Option<String>,
    /// The fleet PKI directory [default: DATA_DIR/pki].
    #[arg(long, global = true, env = "OUTPOST_CLOUD_PKI", value_name = "DIR")]
    pki: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<CloudCmd>,
    #[command(flatten)]
    serve: Args,
}

#[derive(clap::Subcommand)]
enum CloudCmd {
    /// The fleet PKI: CA, broker certificate, fleet signing key, gateway certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCmd,
    },
    /// Enrolled gateways.
    Devices {
        #[command(subcommand)]
        command: DevicesCmd,
    },
    /// Console users (sign-in with a password; roles decide what they may do).
    Users {
        #[command(subcommand)]
        command: UsersCmd,
    },
    /// API tokens (`Authorization: Bearer TOKEN` for scripts and CI).
    Tokens {
        #[command(subcommand)]
        command: TokensCmd,
    },
}

/// Roles: viewer (read), operator (start, cancel, signal), approver (decide approvals), deployer
/// (deployments, desired state), admin (users, tokens, the audit trail; and everything else).
#[derive(clap::Subcommand)]
enum UsersCmd {
    /// Add a user. Prints a generated password, to be changed at the first sign-in.
    Add {
        /// User name.
        name: String,
        /// A role (repeatable): viewer, operator, approver, deployer, admin.
        #[arg(long = "role", required = true, value_name = "ROLE")]
        roles: Vec<String>,
        /// Read the password from standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users, their roles and state.
    List,
    /// Disable a user: they cannot sign in and their sessions end.
    Disable {
        /// User name.
        name: String,
    },
    /// Enable a disabled user.
    Enable {
        /// User name.
        name: String,
    },
    /// Give a user a new generated password, to be changed at their next sign-in.
    ResetPassword {
        /// User name.
        name: String,
    },
}

#[derive(clap::Subcommand)]
enum TokensCmd {
    /// Create a token; it is printed once and stored only as a hash.
    Create {
        /// What it is for (shown in lists and the audit trail as token:NAME).
        #[arg(long)]
        name: String,
        /// A role (repeatable): viewer, operator, approver, deployer, admin.
        #[arg(long = "role", required = true, value_name = "ROLE")]
        roles: Vec<String>,
        /// How long it lasts, e.g. 90d [default: until revoked].
        #[arg(long, value_name = "DURATION")]
        expires: Option<humantime::Duration>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id or name: it is refused from now on.
    Revoke {
        /// Token id or name.
        token: String,
    },
}

#[derive(clap::Subcommand)]
enum PkiCmd {
    /// Make the fleet CA, the broker's and this service's certificates and the fleet signing key
    /// (the first start does this too).
    Init {
        /// Host names and addresses the broker is reached by (repeatable; localhost and
        /// 127.0.0.1 are always included).
        #[arg(long = "broker-name", value_name = "NAME")]
        broker_names: Vec<String>,
    },
    /// Sign a gateway's certificate request (from `outpost keygen`); its subject is the device id.
    Sign {
        /// The request (PEM).
        csr: PathBuf,
        /// Where to write the certificate [default: DEVICE_ID.crt].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Write the Mosquitto files for this fleet: the topic ACL (and print the listener settings).
    Mosquitto {
        /// Directory to write `outpost.acl` to.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// Topic prefix shared with the agents.
        #[arg(long, default_value = outpost_shared::protocol::DEFAULT_PREFIX)]
        sync_prefix: String,
        /// Also give these cloud-sync replicas the service's access (repeatable; see `pki replica`).
        #[arg(long = "replica", value_name = "NAME")]
        replicas: Vec<String>,
    },
    /// Make the client certificate of one more cloud-sync replica (docs/scale-out.md): identity
    /// NAME, which starts with `outpost-cloud-`; run that replica with `--client-id NAME`.
    Replica {
        /// The replica's name, e.g. outpost-cloud-2.
        name: String,
    },
}

#[derive(clap::Subcommand)]
enum DevicesCmd {
    /// Revoke a gateway: cloud-sync refuses its messages from now on, and the CRL (pki/crl.pem)
    /// lists its certificates for the broker.
    Revoke {
        /// Device id.
        id: String,
    },
}

#[derive(clap::Args)]
struct Args {
    /// HTTP API address.
    #[arg(long, env = "OUTPOST_CLOUD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// External MQTT broker, e.g. mqtts://broker.plant:8883 [default: start an embedded one].
    #[arg(long, env = "OUTPOST_CLOUD_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// Address of the embedded broker (without --broker); TLS with client certificates.
    #[arg(long, env = "OUTPOST_CLOUD_MQTT_LISTEN", default_value = "127.0.0.1:8883")]
    mqtt_listen: SocketAddr,
    /// CA of the external broker's certificate [default: PKI/ca.crt].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This service's client certificate for the external broker [default: PKI/cloud.crt].
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Its key [default: PKI/cloud.key].
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// INSECURE: the embedded broker listens in plain text and takes anyone; plain mqtt:// to
    /// another machine is allowed.
    #[arg(long)]
    insecure_plaintext: bool,
    /// INSECURE: neither sign nor check messages (protocol v1): any client of the broker can
    /// forge any gateway and command every one. For tests and old fleets only.
    #[arg(long)]
    insecure_unsigned: bool,
    /// Topic prefix shared with the agents.
    #[arg(long, env = "OUTPOST_SYNC_PREFIX", default_value = outpost_shared::protocol::DEFAULT_PREFIX)]
    sync_prefix: String,
    /// MQTT client id (fixed, so the broker keeps this service's session); also the identity
    /// in this service's certificate.
    #[arg(long, default_value = outpost_cloud_sync::pki::CLOUD_IDENTITY)]
    client_id: String,
    /// Queue commands for devices that never connected and have no certificate from this
    /// fleet (pre-provisioning); without it such commands are refused with 404.
    #[arg(long)]
    allow_unknown_devices: bool,
    /// Run as one of several replicas on one Postgres store (--store postgres://…) and an
    /// external broker: subscribe to device traffic as MQTT shared subscriptions
    /// ($share/GROUP/…), so each message goes to one replica. Give each replica its own
    /// --client-id. See docs/scale-out.md.
    #[arg(long, env = "OUTPOST_CLOUD_SHARED_GROUP", value_name = "GROUP")]
    shared_group: Option<String>,
    /// Most events of mirrored history kept per device; past it the device's oldest ended runs
    /// are forgotten here (never a run still going; the gateway's journal is not affected).
    #[arg(long, env = "OUTPOST_CLOUD_KEEP_EVENTS_PER_DEVICE", default_value_t = 100_000)]
    keep_events_per_device: u64,
    /// How long an ended run's mirrored history is kept after it ended (e.g. 90d, 12h); 0 keeps
    /// it until --keep-events-per-device pushes it out.
    #[arg(long, env = "OUTPOST_CLOUD_KEEP_ENDED_RUNS_FOR", default_value = "90d", value_parser = humantime::parse_duration)]
    keep_ended_runs_for: std::time::Duration,
    /// Most devices the store takes; births and events of further new device ids are refused
    /// (counted as rejected.device_limit).
    #[arg(long, env = "OUTPOST_CLOUD_MAX_DEVICES", default_value_t = outpost_cloud_sync::store::DEFAULT_MAX_DEVICES)]
    max_devices: u64,
    /// The console's and API's HTTPS certificate (PEM) [default: PKI/console.crt, made on first
    /// start: self-signed ECDSA for localhost, this host and every --console-host].
    #[arg(long, env = "OUTPOST_CLOUD_HTTP_CERT", value_name = "FILE", requires = "http_key")]
    http_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "OUTPOST_CLOUD_HTTP_KEY", value_name = "FILE", requires = "http_cert")]
    http_key: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS: only on a loopback --listen address (behind a local
    /// TLS proxy, or for a look on this machine).
    #[arg(long, conflicts_with_all = ["http_cert", "http_key"])]
    plain_http: bool,
    /// INSECURE: serve plain HTTP on any address: passwords, session cookies and tokens cross
    /// the network readable.
    #[arg(long, conflicts_with_all = ["http_cert", "http_key"])]
    insecure_http: bool,
    /// A session unused this long ends (the user signs in again).
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    session_idle: humantime::Duration,
    /// A session ends this long after sign-in, used or not.
    #[arg(long, default_value = "12h", value_name = "DURATION")]
    session_max: humantime::Duration,
    /// A host name the console is reached by (repeatable, or comma-separated in the environment).
    /// Requests naming another host are refused (DNS rebinding); IP addresses and localhost are
    /// always accepted.
    #[arg(
        long = "console-host",
        env = "OUTPOST_CLOUD_CONSOLE_HOSTS",
        value_name = "NAME",
        value_delimiter = ','
    )]
    console_hosts: Vec<String>,
    /// Single sign-on behind a proxy: the header that names the signed-in user, e.g.
    /// X-Remote-User (believed only from --auth-proxy-from).
    #[arg(long, value_name = "HEADER", requires_all = ["auth_proxy_from", "auth_proxy_roles"])]
    auth_proxy_header: Option<String>,
    /// Addresses the sign-on proxy connects from (comma-separated).
    #[arg(long, value_name = "IP,…", value_delimiter = ',')]
    auth_proxy_from: Vec<std::net::IpAddr>,
    /// Roles of proxy-signed-on users: YAML `users: {alice: [approver]}` and `default: [viewer]`.
    #[arg(long, value_name = "FILE")]
    auth_proxy_roles: Option<PathBuf>,
    /// Also start a demo gateway: the `outpost` agent next to this binary, device `demo-gw`,
    /// enrolled in this fleet, running the oven example on the simulated plant.
    #[arg(long)]
    demo: bool,
}

/// The name of the Unix user running this command (for the audit trail).
fn local_user() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    format!("local:{}", outpost_cloud_sync::admin_socket::user_name(uid))
}

/// Runs an admin command: through the running service's admin socket, or on the store itself
/// when no service runs.
fn operator_command(data_dir: &std::path::Path, store: Option<&str>, req: AdminRequest) -> anyhow::Result<()> {
    let socket = outpost_cloud_sync::admin_socket::path(data_dir);
    let reply = match outpost_cloud_sync::admin_socket::request(&socket, &req) {
        Some(r) => r.map_err(anyhow::Error::msg)?,
        None => {
            let store = match store {
                Some(url) => Store::open_spec(url).map_err(|e| anyhow::anyhow!("cannot open the store {url}: {e}"))?,
                None => {
                    let path = data_dir.join("cloud.redb");
                    if !path.exists() {
                        std::fs::create_dir_all(data_dir)
                            .with_context(|| format!("data directory {}", data_dir.display()))?;
                    }
                    Store::open(&path).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot open the store {}: {e}\n  (if outpost-cloud is running, its admin socket {} should answer: is it running as another user?)",
                            path.display(),
                            socket.display()
                        )
                    })?
                }
            };
            let now = outpost_cloud_sync::service::now_ms();
            outpost_cloud_sync::operators::admin::execute(&store, &req, &local_user(), "local", now)?
        }
    };
    print!("{}", reply.text);
    if !reply.text.ends_with('\n') {
        println!();
    }
    Ok(())
}

fn read_password_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The `pki`, `devices`, `users` and `tokens` commands.
fn admin(data_dir: &std::path::Path, store: Option<&str>, pki: &Pki, command: CloudCmd) -> anyhow::Result<()> {
    match command {
        CloudCmd::Users { command } => {
            let req = match command {
                UsersCmd::Add {
                    name,
                    roles,
                    password_stdin,
                } => AdminRequest::UsersAdd {
                    name,
                    roles,
                    password: password_stdin.then(read_password_stdin).transpose()?,
                },
                UsersCmd::List => AdminRequest::UsersList,
                UsersCmd::Disable { name } => AdminRequest::UsersDisable { name },
                UsersCmd::Enable { name } => AdminRequest::UsersEnable { name },
                UsersCmd::ResetPassword { name } => AdminRequest::UsersResetPassword { name },
            };
            return operator_command(data_dir, store, req);
        }
        CloudCmd::Tokens { command } => {
            let req = match command {
                TokensCmd::Create { name, roles, expires } => AdminRequest::TokensCreate {
                    name,
                    roles,
                    expires_ms: expires.map(|d| outpost_cloud_sync::service::now_ms() + d.as_millis() as u64),
                },
                TokensCmd::List => AdminRequest::TokensList,
                TokensCmd::Revoke { token } => AdminRequest::TokensRevoke { token },
            };
            return operator_command(data_dir, store, req);
        }
        CloudCmd::Pki {
            command: PkiCmd::Init { broker_names },
        } => {
            let report = pki.init(&broker_names)?;
            println!("fleet PKI created in {}:", pki.dir().display());
            for f in report.files {
                println!("  {}", f.display());
            }
            println!("keep ca.key and fleet.key secret and backed up: they are the fleet's authority");
        }
        CloudCmd::Pki {
            command: PkiCmd::Sign { csr, out, days },
        } => {
            let text = std::fs::read_to_string(&csr).with_context(|| format!("cannot read {}", csr.display()))?;
            let (id, cert) = pki.sign(&text, days)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{id}.crt")));
            std::fs::write(&out, cert).with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "signed: {} is device {id}'s certificate for {days} days; its messages are accepted from now on.\n\
                 on the gateway: outpost enroll --cert {} --ca {} --fleet-key {}",
                out.display(),
                out.display(),
                pki.file("ca.crt").display(),
                pki.file("fleet.pub").display()
            );
        }
        CloudCmd::Pki {
            command: PkiCmd::Replica { name },
        } => {
            let (cert, key) = pki.replica(&name)?;
            println!(
                "replica {name}: certificate {} and key {}\n  run it with --client-id {name} (it finds them there), \
                 and give the broker's ACL its access: outpost-cloud pki mosquitto --replica {name} …",
                cert.display(),
                key.display()
            );
        }
        CloudCmd::Pki {
            command:
                PkiCmd::Mosquitto {
                    out_dir,
                    sync_prefix,
                    replicas,
                },
        } => {
            let mut services = vec![outpost_cloud_sync::pki::CLOUD_IDENTITY];
            services.extend(replicas.iter().map(String::as_str));
            let acl = outpost_cloud_sync::acl::Rules::new(&sync_prefix).mosquitto_acl(&services);
            let path = out_dir.join("outpost.acl");
            std::fs::write(&path, acl).with_context(|| format!("cannot write {}", path.display()))?;
            println!(
                "wrote {}; listener settings (packaging/mosquitto/outpost-tls.conf):\n  \
                 cafile {}\n  certfile {}\n  keyfile {}\n  crlfile {}\n  require_certificate true\n  \
                 use_identity_as_username true\n  use_username_as_clientid true\n  acl_file {}",
                path.display(),
                pki.file("ca.crt").display(),
                pki.file("broker.crt").display(),
                pki.file("broker.key").display(),
                pki.file("crl.pem").display(),
                path.display()
            );
        }
        CloudCmd::Devices {
            command: DevicesCmd::Revoke { id },
        } => {
            pki.revoke(&id)?;
            println!(
                "device {id} revoked: cloud-sync refuses its messages from now on; {} lists its certificates \
                 (reload the broker to refuse its connections too)",
                pki.file("crl.pem").display()
            );
        }
    }
    Ok(())
}

async fn run(data_dir: PathBuf, store_url: Option<String>, pki: Pki, args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir).with_context(|| format!("data directory {}", data_dir.display()))?;
    if let Some(group) = &args.shared_group {
        if group.is_empty() || group.contains(['/', '+', '#']) {
            anyhow::bail!("--shared-group '{group}': a group name is one topic level, without / + or #");
        }
        if args.broker.is_none() {
            anyhow::bail!(
                "--shared-group needs --broker: replicas share an external broker, not each one's embedded one"
            );
        }
        if !store_url.as_deref().is_some_and(|u| u.starts_with("postgres")) {
            anyhow::bail!(
                "--shared-group needs --store postgres://…: each replica stores the messages it receives, so they \
                 must share one store"
            );
        }
    }
    let store_path = data_dir.join("cloud.redb");
    let store = match &store_url {
        Some(url) => {
            let url = url.clone();
            // Connecting waits on the network: off the async workers.
            tokio::task::spawn_blocking(move || Store::open_spec(&url))
                .await?
                .map_err(|e| anyhow::anyhow!("cannot open the store: {e}"))?
        }
        None => open_store(&store_path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the store {}: {e}\n  if the file is damaged, move it aside (keep it for forensics) and start \
                 with an empty store, or restore it from a backup",
                store_path.display()
            )
        })?,
    };
    let store_shown = match (store.kind(), &store_url) {
        ("redb", Some(path)) => path.clone(),
        ("redb", None) => store_path.display().to_string(),
        _ => store.location(),
    };
    store.set_max_devices(args.max_devices);
    if let Some(password) =
        outpost_cloud_sync::operators::admin::first_admin(&store, outpost_cloud_sync::service::now_ms())?
    {
        println!(
            "first start: console user 'admin' created with the one-time password\n  {password}\n  (shown once; choose your own at the first sign-in; more users: outpost-cloud users add NAME --role ROLE)"
        );
    }
    let proxy = match &args.auth_proxy_header {
        None => None,
        Some(h) => {
            let file = args.auth_proxy_roles.clone().unwrap_or_default();
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("--auth-proxy-roles {}", file.display()))?;
            let roles =
                RoleMap::parse(&text).map_err(|e| anyhow::anyhow!("--auth-proxy-roles {}: {e}", file.display()))?;
            let header = h
                .parse()
                .map_err(|_| anyhow::anyhow!("--auth-proxy-header '{h}' is not a header name"))?;
            info!(header = %h, from = ?args.auth_proxy_from, "single sign-on: users named by the proxy's header are signed in");
            Some(ProxyAuth {
                header,
                from: args.auth_proxy_from.clone(),
                roles,
            })
        }
    };
    let https = !(args.plain_http || args.insecure_http);
    if !https && !args.listen.ip().is_loopback() && !args.insecure_http {
        anyhow::bail!(
            "--plain-http on {}: plain HTTP is only served on a loopback address (passwords and tokens would cross the network readable); serve HTTPS (the default), or give --insecure-http to accept the risk",
            args.listen
        );
    }
    if args.insecure_http {
        tracing::warn!(listen = %args.listen, "INSECURE: --insecure-http: the console and API are plain HTTP; passwords, session cookies and tokens cross the network readable");
    }
    let access_opts = AccessOptions {
        https,
        sessions: outpost_cloud_sync::operators::SessionPolicy {
            idle_ms: args.session_idle.as_millis() as u64,
            max_ms: args.session_max.as_millis() as u64,
        },
        hosts: args.console_hosts.clone(),
        proxy,
        ..AccessOptions::default()
    };
    let external = args
        .broker
        .as_deref()
        .map(|url| outpost_shared::broker::BrokerUrl::parse(url, "--broker").map_err(anyhow::Error::msg))
        .transpose()?;
    if let Some(url) = &external {
        outpost_shared::tls::check_plaintext(url, args.insecure_plaintext, "--broker").map_err(anyhow::Error::msg)?;
    }
    let needs_pki = !args.insecure_unsigned
        || external
            .as_ref()
            .map_or(!args.insecure_plaintext, |u| u.tls && args.ca.is_none());
    if needs_pki && !pki.exists() {
        let report = pki.init(&[host_name()])?;
        println!(
            "first start: fleet PKI created in {} ({} files; keep ca.key and fleet.key secret and backed up)",
            pki.dir().display(),
            report.files.len()
        );
    }
    if args.insecure_unsigned {
        tracing::warn!(
            "INSECURE: --insecure-unsigned: messages are neither signed nor checked; any client of the broker can forge any gateway and command every one"
        );
    }
    #[allow(unused_mut)]
    let mut gate: Option<std::sync::Arc<outpost_cloud_sync::acl::GateStats>> = None;
    let (host, port, tls) = match &external {
        Some(url) => {
            let tls = if url.tls {
                let files = TlsFiles {
                    ca: args.ca.clone().unwrap_or_else(|| pki.file("ca.crt")),
                    cert: Some(
                        args.cert
                            .clone()
                            .unwrap_or_else(|| service_file(&pki, &args.client_id, "crt")),
                    ),
                    key: Some(
                        args.key
                            .clone()
                            .unwrap_or_else(|| service_file(&pki, &args.client_id, "key")),
                    ),
                };
                Some(outpost_shared::tls::client_config(&files)?)
            } else {
                tracing::warn!(broker = %url.url(), "INSECURE: plain-text MQTT to the broker");
                None
            };
            (url.host.clone(), url.port, tls)
        }
        #[cfg(feature = "embedded-broker")]
        None => {
            let (host, port, tls, stats) = start_embedded(&pki, &args).await?;
            gate = stats;
            (host, port, tls)
        }
        #[cfg(not(feature = "embedded-broker"))]
        None => anyhow::bail!("this build has no embedded broker: give --broker mqtts://HOST:PORT"),
    };
    let security = if args.insecure_unsigned {
        Security::Unsigned
    } else {
        Security::Signed {
            fleet: std::sync::Arc::new(pki.fleet_key()?),
            keyring: std::sync::Arc::new(Keyring::new(pki.clone())),
        }
    };
    let scheme = if tls.is_some() { "mqtts" } else { "mqtt" };
    let link = Link {
        host: host.clone(),
        port,
        prefix: args.sync_prefix.clone(),
        client_id: args.client_id.clone(),
        tls,
        security,
        allow_unknown_devices: args.allow_unknown_devices,
        shared_group: args.shared_group.clone(),
        retention: outpost_cloud_sync::service::RetentionPolicy {
            events_per_device: args.keep_events_per_device,
            ended_runs_for: (!args.keep_ended_runs_for.is_zero()).then_some(args.keep_ended_runs_for),
        },
    };
    let service = Service::start(store, link);
    if let Some(stats) = gate {
        service.attach_gate(stats);
    }
    let access = Access::new(service.store.clone(), access_opts)?;
    let socket = outpost_cloud_sync::admin_socket::path(&data_dir);
    let _admin = outpost_cloud_sync::admin_socket::serve(&socket, access.clone())
        .await
        .with_context(|| format!("cannot listen on the admin socket {}", socket.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let web_tls = if https {
        let (cert, key) = match (&args.http_cert, &args.http_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let mut names = vec![host_name()];
                names.extend(args.console_hosts.iter().cloned());
                if !args.listen.ip().is_unspecified() {
                    names.push(args.listen.ip().to_string());
                }
                if outpost_cloud_sync::pki::ensure_console_cert(pki.dir(), &names)? {
                    println!(
                        "first start: console certificate {} made (self-signed; have browsers trust it, or give --http-cert/--http-key)",
                        pki.file("console.crt").display()
                    );
                }
                (pki.file("console.crt"), pki.file("console.key"))
            }
        };
        Some(outpost_shared::tls::web_server_config(&cert, &key)?)
    } else {
        None
    };
    let web = if https { "https" } else { "http" };
    let mqtt_url = format!("{scheme}://{host}:{port}");
    println!(
        "outpost-cloud: API on {web}://{}/v1/devices, MQTT at {mqtt_url}, store {}",
        args.listen, store_shown
    );
    println!("console: {web}://{}/", args.listen);
    let mut demo = None;
    if args.demo {
        demo_users(&service.store)?;
        demo = Some(start_demo(&data_dir, &pki, &args, &mqtt_url, web)?);
        queue_demo_lot(&service).await?;
    }
    let app = api::router(service.clone(), access.clone());
    let make = app.into_make_service_with_connect_info::<outpost_cloud_sync::access::PeerAddr>();
    let serve: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match web_tls {
        Some(config) => {
            let tls = outpost_cloud_sync::https::TlsListener::new(listener, config)?;
            Box::pin(axum::serve(tls, make).into_future())
        }
        None => Box::pin(axum::serve(listener, make).into_future()),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch for SIGTERM")?;
    let served = tokio::select! {
        r = serve => r.context("HTTP server"),
        _ = tokio::signal::ctrl_c() => { info!("interrupted; stopping"); Ok(()) }
        _ = term.recv() => { info!("SIGTERM; stopping"); Ok(()) }
    };
    // The demo gateway goes with us, whichever way we stop (it would otherwise hold the data
    // directory and keep reconnecting to a broker that is gone).
    if let Some(mut child) = demo {
        stop_child(&mut child);
    }
    service.save_counts().await;
    let _ = std::fs::remove_file(&socket);
    served
}

/// Starts the embedded broker: TLS with client certificates through the gate, or plain under
/// --insecure-plaintext. Returns where this service connects.
#[cfg(feature = "embedded-broker")]
async fn start_embedded(
    pki: &Pki,
    args: &Args,
) -> anyhow::Result<(
    String,
    u16,
    Option<std::sync::Arc<rustls::ClientConfig>>,
    Option<std::sync::Arc<outpost_cloud_sync::acl::GateStats>>,
)> {
    use outpost_cloud_sync::broker::{Listen, start};
    let addr = args.mqtt_listen;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    if args.insecure_plaintext {
        start(Listen::Plain(addr)).await.map_err(anyhow::Error::msg)?;
        tracing::warn!(mqtt = %addr, "INSECURE: --insecure-plaintext: the embedded broker takes anyone in plain text, and any client may publish on any topic");
        return Ok((host, addr.port(), None, None));
    }
    let config = outpost_shared::tls::server_config(
        &pki.file("ca.crt"),
        &pki.file("broker.crt"),
        &pki.file("broker.key"),
        Some(&pki.file("crl.pem")),
    )?;
    let running = start(Listen::Tls {
        addr,
        config,
        prefix: args.sync_prefix.clone(),
        service: args.client_id.clone(),
    })
    .await
    .map_err(anyhow::Error::msg)?;
    info!(mqtt = %addr, "embedded MQTT broker started: TLS, client certificates from the fleet CA, topic rules per identity (sessions in memory: after a restart gateways resend what was not acknowledged; --broker for a broker of its own)");
    let files = TlsFiles {
        ca: pki.file("ca.crt"),
        cert: Some(pki.file("cloud.crt")),
        key: Some(pki.file("cloud.key")),
    };
    Ok((
        host,
        addr.port(),
        Some(outpost_shared::tls::client_config(&files)?),
        Some(running.stats),
    ))
}

fn host_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() {
        "localhost".into()
    } else {
        host.to_string()
    }
}

/// This service's client certificate or key: a replica's own (`pki replica`) when `client_id`
/// names one, else the fleet service's.
fn service_file(pki: &Pki, client_id: &str, ext: &str) -> PathBuf {
    let own = pki.dir().join("replicas").join(format!("{client_id}.{ext}"));
    if client_id != outpost_cloud_sync::pki::CLOUD_IDENTITY && own.exists() {
        own
    } else {
        pki.file(&format!("cloud.{ext}"))
    }
}

/// Opens the store; test builds can put it on a backend that fails like a full disk.
fn open_store(path: &std::path::Path) -> Result<Store, outpost_cloud_sync::store::StoreError> {
    #[cfg(feature = "fault-injection")]
    if let Some(marker) = std::env::var_os("OUTPOST_CLOUD_FULL_DISK_MARKER") {
        tracing::warn!(marker = ?marker, "fault injection: the store fails like a full disk while the marker file exists");
        let (path, marker) = (path.to_path_buf(), PathBuf::from(marker));
        return Store::open_with(Box::new(move || {
            let backend = outpost_shared::fault::FullDiskWhenMarked::open(&path, &marker)
                .map_err(|e| outpost_cloud_sync::store::StoreError::Storage(redb::StorageError::Io(e).into()))?;
            Ok(redb::Database::builder().create_with_backend(backend)?)
        }));
    }
    Store::open(path)
}

/// Asks a child to stop (SIGTERM), and kills it if it has not within 5 s.
fn stop_child(child: &mut std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill only sends a signal, to our own child, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Queues a quality-gate run with its lot signal for the demo gateway, so the console has a gate
/// to approve. Fixed command ids: a second `--demo` start queues nothing new.
async fn queue_demo_lot(service: &Service) -> anyhow::Result<()> {
    let start = CommandKind::Start {
        workflow: "quality-gate".into(),
        version: None,
        input: "{}".into(),
        run_id: Some("lot-7".into()),
    };
    let signal = CommandKind::Signal {
        run_id: "lot-7".into(),
        name: "lot-ready".into(),
        payload: r#"{"lot": 7, "kg": 120}"#.into(),
        by: "outpost-cloud --demo".into(),
    };
    service
        .command("demo-gw", Some("demo-lot-7-start".into()), start)
        .await?;
    service
        .command("demo-gw", Some("demo-lot-7-ready".into()), signal)
        .await?;
    // A second start queues nothing new: say what lot-7 is doing now, not what it did first.
    let store = service.store.clone();
    let mirrored = tokio::task::spawn_blocking(move || store.run("demo-gw", "lot-7"))
        .await
        .map_err(anyhow::Error::from)?
        .map_err(anyhow::Error::from)?;
    match mirrored {
        Some((m, _)) if m.status.is_terminal() => println!(
            "  lot-7:    already {} (start another quality-gate run from the console)",
            m.status.as_str()
        ),
        _ => println!("  approve:  open the console, run lot-7 waits for your approval at step 'release'"),
    }
    Ok(())
}

/// The demo's users: alice and bob, who may run and approve the quality gate (its approvers).
/// Their passwords are printed when they are made (the first `--demo` start).
fn demo_users(store: &Store) -> anyhow::Result<()> {
    for name in ["alice", "bob"] {
        let req = AdminRequest::UsersAdd {
            name: name.into(),
            roles: vec!["operator".into(), "approver".into(), "deployer".into()],
            password: Some(outpost_cloud_sync::operators::new_password()?),
        };
        let password = match &req {
            AdminRequest::UsersAdd { password, .. } => password.clone().unwrap_or_default(),
            _ => String::new(),
        };
        if store.user(name)?.is_some() {
            println!(
                "  demo user {name}: exists (its password was printed at the first --demo start; outpost-cloud users reset-password {name})"
            );
            continue;
        }
        outpost_cloud_sync::operators::admin::execute(
            store,
            &req,
            "outpost-cloud --demo",
            "local",
            outpost_cloud_sync::service::now_ms(),
        )?;
        println!("  demo user {name} (operator, approver, deployer): password {password}");
    }
    Ok(())
}

/// Starts the demo gateway and prints how to look at it.
fn start_demo(
    data_dir: &std::path::Path,
    pki: &Pki,
    args: &Args,
    mqtt_url: &str,
    web: &str,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::var_os("OUTPOST_BIN")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok().map(|p| p.with_file_name("outpost")))
        .filter(|p| p.exists())
        .context(
            "the demo needs the `outpost` agent binary next to outpost-cloud (cargo build --release) or $OUTPOST_BIN",
        )?;
    let examples = ["examples", concat!(env!("CARGO_MANIFEST_DIR"), "/../examples")]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("oven-plant.yaml").exists())
        .context("the demo needs the examples/ directory of the source tree")?;
    let agent_dir = data_dir.join("demo-agent");
    if (!args.insecure_unsigned || !args.insecure_plaintext) && pki.enroll_local(&exe, &agent_dir, "demo-gw")? {
        println!(
            "demo gateway 'demo-gw' enrolled: its key in {}, its certificate signed by this fleet",
            agent_dir.join("identity").display()
        );
    }
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("run")
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["--broker", mqtt_url, "--device-id", "demo-gw", "--label", "site=demo"])
        .arg("--equipment")
        .arg(examples.join("equipment/sim.yaml"))
        .arg("--apply")
        .arg(examples.join("oven-plant.yaml"))
        .arg("--apply")
        .arg(examples.join("quality-gate.yaml"))
        .args(["--start", "oven-plant", "--input", r#"{"limit_celsius": 80}"#]);
    if args.insecure_unsigned {
        cmd.arg("--insecure-unsigned");
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {}", exe.display()))?;
    let api = args.listen;
    println!(
        "demo gateway 'demo-gw' started (agent data in {}).\n  console:  {web}://{api}/ (sign in as alice or bob)\n  API:      TOKEN=$(outpost-cloud --data-dir {} tokens create --name me --role operator | grep ^opt_)\n            curl --cacert {} -H \"Authorization: Bearer $TOKEN\" {web}://{api}/v1/devices/demo-gw/runs\n  command:  curl --cacert {} -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -X POST {web}://{api}/v1/devices/demo-gw/commands -d '{{\"type\":\"start\",\"workflow\":\"oven-plant\",\"input\":{{\"limit_celsius\":80}}}}'",
        agent_dir.display(),
        data_dir.display(),
        pki.file("console.crt").display(),
        pki.file("console.crt").display()
    );
    Ok(child)
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::WARN)
        .with_target("outpost_cloud_sync", tracing::Level::INFO)
        .with_target("outpost_cloud", tracing::Level::INFO);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only on a terminal: log files and pipes get plain text.
                .with_ansi(
                    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none(),
                ),
        )
        .with(filter)
        .init();
    let cli = Cli::parse();
    let pki = Pki::new(cli.pki.clone().unwrap_or_else(|| cli.data_dir.join("pki")));
    if let Some(command) = cli.command {
        return match admin(&cli.data_dir, cli.store.as_deref(), &pki, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.data_dir, cli.store, pki, cli.serve)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
