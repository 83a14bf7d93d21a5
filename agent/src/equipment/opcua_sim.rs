//! `outpost opcua-sim`: a small OPC UA server (async-opcua's, with an in-memory node manager)
//! whose address space is the points given on the command line, so examples and tests run
//! without a PLC. Writes are logged as JSON lines (what the node now holds, and what was asked
//! when a clamp changed it); a clamp caps a numeric node like a PLC enforcing limits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use opcua::crypto::SecurityPolicy;
use opcua::nodes::{AccessLevel, MethodBuilder};
use opcua::server::address_space::Variable;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use opcua::server::{ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerUserToken};
use opcua::types::{DataTypeId, DataValue, DateTime, MessageSecurityMode, NodeId, StatusCode, Variant};
use serde_json::{Value, json};

use super::opcua::{DataType, Point, PointSpec};

/// The namespace the simulated nodes live in (`ns=2;s=NAME`).
pub const NAMESPACE_URI: &str = "urn:outpost:opcua-sim:nodes";

/// One node of the simulator: `NAME=TYPE[=VALUE]`.
#[derive(Debug, Clone)]
pub struct SimNode {
    /// Name, also the string node id.
    pub name: String,
    /// Data type.
    pub data_type: DataType,
    /// Initial value (JSON; the type's zero when absent).
    pub initial: Option<Value>,
}

impl SimNode {
    /// Parses `NAME=TYPE[=VALUE]`.
    pub fn parse(text: &str) -> Result<SimNode, String> {
        let mut parts = text.splitn(3, '=');
        let (Some(name), Some(ty)) = (parts.next(), parts.next()) else {
            return Err(format!("--node '{text}' is not NAME=TYPE[=VALUE]"));
        };
        let data_type: DataType = serde_json::from_value(json!(ty)).map_err(|_| {
            format!("--node '{text}': '{ty}' is not an OPC UA type (Boolean, UInt16, Float, Double, String, …)")
        })?;
        let initial = parts
            .next()
            .map(|v| serde_json::from_str(v).unwrap_or_else(|_| json!(v)));
        Ok(SimNode {
            name: name.to_string(),
            data_type,
            initial,
        })
    }
}

/// One method of the simulator: `NAME[=TYPE,...]` (its input types).
#[derive(Debug, Clone)]
pub struct SimMethod {
    /// Name, also the string node id.
    pub name: String,
    /// Input argument types, in order.
    pub inputs: Vec<DataType>,
}

impl SimMethod {
    /// Parses `NAME[=TYPE,...]`.
    pub fn parse(text: &str) -> Result<SimMethod, String> {
        let (name, types) = text.split_once('=').unwrap_or((text, ""));
        let inputs = types
            .split(',')
            .filter(|t| !t.trim().is_empty())
            .map(|t| {
                serde_json::from_value(json!(t.trim()))
                    .map_err(|_| format!("--method '{text}': '{t}' is not an OPC UA type (Boolean, UInt16, String, …)"))
            })
            .collect::<Result<Vec<DataType>, String>>()?;
        Ok(SimMethod {
            name: name.to_string(),
            inputs,
        })
    }
}

fn type_id(t: DataType) -> DataTypeId {
    match t {
        DataType::Boolean => DataTypeId::Boolean,
        DataType::SByte => DataTypeId::SByte,
        DataType::Byte => DataTypeId::Byte,
        DataType::Int16 => DataTypeId::Int16,
        DataType::UInt16 => DataTypeId::UInt16,
        DataType::Int32 => DataTypeId::Int32,
        DataType::UInt32 => DataTypeId::UInt32,
        DataType::Int64 => DataTypeId::Int64,
        DataType::UInt64 => DataTypeId::UInt64,
        DataType::Float => DataTypeId::Float,
        DataType::Double => DataTypeId::Double,
        DataType::String => DataTypeId::String,
        DataType::DateTime => DataTypeId::DateTime,
    }
}

/// What the simulator serves.
pub struct SimOptions {
    /// Nodes.
    pub nodes: Vec<SimNode>,
    /// Numeric nodes whose writes are capped at a maximum.
    pub clamps: HashMap<String, f64>,
    /// Users (`NAME:PASSWORD`); with any, anonymous sessions are refused.
    pub users: Vec<(String, String)>,
    /// Users who sign in with a certificate (`NAME:CERT_FILE`); with any, anonymous sessions are refused.
    pub cert_users: Vec<(String, PathBuf)>,
    /// Offer only Basic256Sha256 / SignAndEncrypt (no unsecured endpoint).
    pub only_secure: bool,
    /// The server's certificate and key, and client certificates.
    pub pki_dir: PathBuf,
    /// Methods (`ns=2;s=NAME`) on the simulator's object.
    pub methods: Vec<SimMethod>,
    /// Time taken over each node written.
    pub write_delay: std::time::Duration,
    /// Numeric nodes the simulator itself counts up by one at an interval (a part counter).
    pub ticks: Vec<(String, std::time::Duration)>,
}

fn zero(t: DataType) -> Value {
    match t {
        DataType::Boolean => json!(false),
        DataType::String => json!(""),
        DataType::DateTime => json!("2000-01-01T00:00:00Z"),
        _ => json!(0),
    }
}

/// Serves until the task is dropped; `log` gets the listening line first, then one line per write.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: SimOptions,
    log: Arc<dyn Fn(Value) + Send + Sync>,
) -> Result<(), String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let url = format!("opc.tcp://{}:{}/", addr.ip(), addr.port());
    let mut tokens: Vec<String> = Vec::new();
    if opts.users.is_empty() && opts.cert_users.is_empty() {
        tokens.push(ANONYMOUS_USER_TOKEN_ID.to_string());
    }
    let mut builder = ServerBuilder::new()
        .application_name("Outpost OPC UA simulator")
        .application_uri("urn:outpost:opcua-sim")
        .product_uri("urn:outpost:opcua-sim")
        .create_sample_keypair(true)
        .pki_dir(&opts.pki_dir)
        .host(addr.ip().to_string())
        .port(addr.port())
        .discovery_urls(vec![url.clone()])
        .trust_client_certs(true)
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: NAMESPACE_URI.to_owned(),
                ..Default::default()
            },
            "sim",
        ));
    for (u, p) in &opts.users {
        builder = builder.add_user_token(u.clone(), ServerUserToken::user_pass(u.clone(), p.clone()));
        tokens.push(u.clone());
    }
    for (u, cert) in &opts.cert_users {
        builder = builder.add_user_token(u.clone(), ServerUserToken::x509(u.clone(), cert));
        tokens.push(u.clone());
    }
    let ids: Vec<&str> = tokens.iter().map(String::as_str).collect();
    if !opts.only_secure {
        builder = builder.add_endpoint("none", ("/", SecurityPolicy::None, MessageSecurityMode::None, &ids[..]));
    }
    builder = builder.add_endpoint(
        "basic256sha256",
        (
            "/",
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
            &ids[..],
        ),
    );
    let (server, handle) = builder.build()?;
    let manager = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .ok_or("no node manager")?;
    let ns = handle
        .get_namespace_index(NAMESPACE_URI)
        .ok_or("no namespace for the simulated nodes")?;

    // Each value with its source timestamp: when it last changed, as a PLC reports it.
    let store: Arc<Mutex<HashMap<NodeId, (Variant, DateTime)>>> = Arc::default();
    {
        let mut space = manager.address_space().write();
        let folder = NodeId::new(ns, "outpost-sim");
        space.add_folder(&folder, "Simulator", "Simulator", &NodeId::objects_folder_id());
        let mut vars = Vec::new();
        for n in &opts.nodes {
            let point = sim_point(n, ns)?;
            let initial = n.initial.clone().unwrap_or_else(|| zero(n.data_type));
            let value = point.encode(&initial).map_err(|e| format!("--node {}: {e}", n.name))?;
            let id = NodeId::new(ns, n.name.as_str());
            let mut v = Variable::new(&id, n.name.as_str(), n.name.as_str(), value.clone());
            v.set_writable(true);
            v.set_user_access_level(AccessLevel::CURRENT_READ | AccessLevel::CURRENT_WRITE);
            vars.push(v);
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, (value, DateTime::now()));
        }
        let _ = space.add_variables(vars, &folder);
        for m in &opts.methods {
            let id = NodeId::new(ns, m.name.as_str());
            let names: Vec<String> = (1..=m.inputs.len()).map(|i| format!("In{i}")).collect();
            let inputs: Vec<_> = names
                .iter()
                .zip(&m.inputs)
                .map(|(n, t)| (n.as_str(), type_id(*t)).into())
                .collect();
            MethodBuilder::new(&id, m.name.as_str(), m.name.as_str())
                .component_of(folder.clone())
                .input_args(&mut *space, &NodeId::new(ns, format!("{}.Inputs", m.name)), &inputs)
                .output_args(
                    &mut *space,
                    &NodeId::new(ns, format!("{}.Outputs", m.name)),
                    &[("Calls", DataTypeId::UInt32).into()],
                )
                .executable(true)
                .user_executable(true)
                .insert(&mut *space);
        }
    }
    for m in &opts.methods {
        let (log, name) = (log.clone(), m.name.clone());
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        manager
            .inner()
            .add_method_callback(NodeId::new(ns, m.name.as_str()), move |args| {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let args: Vec<Value> = args.iter().map(variant_json).collect();
                log(json!({"call": name, "args": args, "calls": n}));
                Ok(vec![Variant::UInt32(n)])
            });
    }
    for n in &opts.nodes {
        let id = NodeId::new(ns, n.name.as_str());
        let point = sim_point(n, ns)?;
        let (read_store, read_id) = (store.clone(), id.clone());
        manager.inner().add_read_callback(id.clone(), move |_, _, _| {
            let v = read_store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&read_id)
                .cloned();
            Ok(match v {
                Some((value, changed)) => DataValue {
                    value: Some(value),
                    status: Some(StatusCode::Good),
                    source_timestamp: Some(changed),
                    server_timestamp: Some(DateTime::now()),
                    ..Default::default()
                },
                None => DataValue::new_now(Variant::Empty),
            })
        });
        let (write_store, write_id, log, name) = (store.clone(), id.clone(), log.clone(), n.name.clone());
        let clamp = opts.clamps.get(&n.name).copied();
        let delay = opts.write_delay;
        manager.inner().add_write_callback(id, move |dv, _| {
            // A slow PLC holds up the request (the sim serves nothing else meanwhile, as one would).
            std::thread::sleep(delay);
            let Some(asked) = dv.value else {
                return StatusCode::BadNothingToDo;
            };
            let Ok(asked_json) = point.decode(&asked) else {
                return StatusCode::BadTypeMismatch;
            };
            let stored = match (clamp, asked_json.as_f64()) {
                (Some(max), Some(x)) if x > max => match point.encode(&json!(max)) {
                    Ok(v) => v,
                    Err(_) => return StatusCode::BadOutOfRange,
                },
                _ => asked.clone(),
            };
            let stored_json = point.decode(&stored).unwrap_or(Value::Null);
            let mut line = json!({"write": name, "value": stored_json});
            if stored_json != asked_json {
                line["requested"] = asked_json;
            }
            write_store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(write_id.clone(), (stored, DateTime::now()));
            log(line);
            StatusCode::Good
        });
    }
    for (name, every) in &opts.ticks {
        let id = NodeId::new(ns, name.as_str());
        let node = opts
            .nodes
            .iter()
            .find(|n| &n.name == name)
            .ok_or_else(|| format!("--tick {name}: no such --node"))?;
        let point = sim_point(node, ns)?;
        let (store, log, name, every) = (store.clone(), log.clone(), name.clone(), *every);
        tokio::spawn(async move {
            let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                timer.tick().await;
                let mut values = store.lock().unwrap_or_else(|p| p.into_inner());
                let Some((v, changed)) = values.get_mut(&id) else {
                    return;
                };
                let next = point.decode(v).ok().and_then(|j| j.as_f64()).map(|x| json!(x + 1.0));
                if let Some(Ok(n)) = next.map(|j| point.encode(&j)) {
                    *v = n;
                    *changed = DateTime::now();
                    log(json!({"tick": name, "value": point.decode(v).unwrap_or(Value::Null)}));
                }
            }
        });
    }
    log(json!({"listening": url, "namespace": ns}));
    server.run_with(listener).await
}

/// A method argument as JSON for the call log.
fn variant_json(v: &Variant) -> Value {
    match v {
        Variant::Boolean(b) => json!(b),
        Variant::SByte(x) => json!(x),
        Variant::Byte(x) => json!(x),
        Variant::Int16(x) => json!(x),
        Variant::UInt16(x) => json!(x),
        Variant::Int32(x) => json!(x),
        Variant::UInt32(x) => json!(x),
        Variant::Int64(x) => json!(x),
        Variant::UInt64(x) => json!(x),
        Variant::Float(x) => json!(x),
        Variant::Double(x) => json!(x),
        Variant::String(s) => json!(s.as_ref()),
        other => json!(super::opcua::variant_text(other)),
    }
}

fn sim_point(n: &SimNode, ns: u16) -> Result<Point, String> {
    Point::new(&PointSpec {
        node: format!("ns={ns};s={}", n.name),
        data_type: n.data_type,
        scale: None,
        unit: None,
    })
}
