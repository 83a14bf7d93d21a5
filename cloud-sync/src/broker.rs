//! The embedded MQTT broker (rumqttd) for the zero-install default. In-memory only: fine for a
//! demo and tests on one machine, not a production broker (use Mosquitto, EMQX, …).

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts rumqttd on `listen` in its own threads.
pub fn start(listen: SocketAddr) -> Result<(), String> {
    // Fail early with a clear message if the port is taken (rumqttd would only log it).
    std::net::TcpListener::bind(listen).map_err(|e| format!("embedded broker cannot listen on {listen}: {e}"))?;
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            // Larger packets are refused at the door: the publisher is disconnected, nobody
            // downstream receives them.
            max_payload_size: outpost_shared::protocol::MAX_PACKET_BYTES,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}
