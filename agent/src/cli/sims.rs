//! `outpost modbus-sim` and `outpost opcua-sim`: the simulators' flags mapped to their options.

use super::*;

pub(super) fn run_modbus_sim(args: ModbusSimArgs) -> Result<u8, Failure> {
    init_tracing();
    let mut clamps = std::collections::HashMap::new();
    for c in &args.clamp {
        let parsed = c
            .split_once('=')
            .and_then(|(a, m)| Some((a.trim().parse::<u16>().ok()?, m.trim().parse::<u16>().ok()?)));
        let (a, m) = parsed.ok_or_else(|| Failure::new(exit::INVALID, format!("--clamp '{c}' is not ADDRESS=MAX")))?;
        clamps.insert(a, m);
    }
    let faults = crate::equipment::modbus::SimFaults {
        busy_first: args.busy_first,
        delay: Duration::from_millis(args.delay_ms),
        limit: args.limit.unwrap_or(0),
        clamps,
        short_reads: args.short_reads,
    };
    let log: Arc<dyn Fn(Value) + Send + Sync> = Arc::new(|v: Value| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    });
    if let Some(port) = args.rtu.clone() {
        return block_on(async move {
            let sim = crate::equipment::modbus::Simulator::new(faults, log.clone());
            log(json!({"listening": port}));
            sim.serve_rtu(&port, args.baud)
                .await
                .map_err(|e| Failure::new(exit::FAILURE, format!("modbus simulator on {port}: {e}")))?;
            Ok(exit::OK)
        });
    }
    block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("binding {}: {e}", args.listen)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
        log(json!({"listening": addr.to_string()}));
        crate::equipment::modbus::Simulator::new(faults, log)
            .serve(listener)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("modbus simulator: {e}")))?;
        Ok(exit::OK)
    })
}

#[cfg(feature = "opcua-sim")]
pub(super) fn run_opcua_sim(args: OpcuaSimArgs) -> Result<u8, Failure> {
    use crate::equipment::opcua_sim;
    let invalid = |m: String| Failure::new(exit::INVALID, m);
    let nodes = args
        .node
        .iter()
        .map(|n| opcua_sim::SimNode::parse(n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    if nodes.is_empty() {
        return Err(invalid("give at least one --node NAME=TYPE[=VALUE]".into()));
    }
    let mut clamps = std::collections::HashMap::new();
    for c in &args.clamp {
        let parsed = c
            .split_once('=')
            .and_then(|(n, m)| Some((n.trim().to_string(), m.trim().parse::<f64>().ok()?)));
        let (n, m) = parsed.ok_or_else(|| invalid(format!("--clamp '{c}' is not NAME=MAX")))?;
        clamps.insert(n, m);
    }
    // `NAME:VALUE` options, refused by flag and form.
    let named = |list: &[String], flag: &str, form: &str| {
        list.iter()
            .map(|u| {
                u.split_once(':')
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .ok_or_else(|| invalid(format!("{flag} '{u}' is not {form}")))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let users = named(&args.user, "--user", "NAME:PASSWORD")?;
    let cert_users = named(&args.user_cert, "--user-cert", "NAME:CERT_FILE")?
        .into_iter()
        .map(|(n, f)| (n, PathBuf::from(f)))
        .collect();
    let ticks = args
        .tick
        .iter()
        .map(|t| {
            t.split_once('=')
                .and_then(|(n, d)| Some((n.to_string(), outpost_shared::definition::parse_duration(d).ok()?)))
                .filter(|(_, d)| !d.is_zero())
                .ok_or_else(|| invalid(format!("--tick '{t}' is not NAME=DURATION (e.g. Parts=2s)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scratch = tempfile::tempdir().map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    let pki_dir = args.pki_dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    let log: Arc<dyn Fn(Value) + Send + Sync> = Arc::new(|v: Value| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    });
    block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("binding {}: {e}", args.listen)))?;
        let opts = opcua_sim::SimOptions {
            nodes,
            clamps,
            users,
            only_secure: args.only_secure,
            cert_users,
            pki_dir,
            methods: args
                .method
                .iter()
                .map(|m| opcua_sim::SimMethod::parse(m))
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?,
            write_delay: std::time::Duration::from_millis(args.delay_ms),
            ticks,
        };
        opcua_sim::serve(listener, opts, log)
            .await
            .map_err(|e| Failure::new(exit::FAILURE, format!("opcua simulator: {e}")))?;
        Ok(exit::OK)
    })
}
