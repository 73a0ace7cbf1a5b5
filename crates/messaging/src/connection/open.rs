//! Opening one connection and declaring the topology on it, each bounded by the
//! connect timeout; used at startup and by every reconnect attempt.

use lapin::{Connection, ConnectionProperties, tcp::OwnedTLSConfig, types::LongString};

use super::connect_error::{ConnectError, classify};
use crate::{AmqpSettings, Topology};

/// Opens one connection, mapping failures to a clear [`ConnectError`].
pub(crate) async fn open(settings: &AmqpSettings) -> Result<Connection, ConnectError> {
    let endpoint = format!("{}:{}", settings.host(), settings.port());
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = &settings.ca_file {
        tls.cert_chain = Some(
            std::fs::read_to_string(path).map_err(|e| ConnectError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        );
    }
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(settings.connection_name.as_str()));
    let builder = lapin::DefaultConnectionBuilder::new()
        .map_err(|e| ConnectError::Other {
            endpoint: endpoint.clone(),
            reason: e.to_string(),
        })?
        .with_uri(settings.uri())
        .with_properties(properties)
        .with_tls_config(tls);
    match tokio::time::timeout(settings.connect_timeout, builder.connect()).await {
        Err(_) => Err(ConnectError::Timeout {
            endpoint,
            timeout: settings.connect_timeout,
        }),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(classify(settings, endpoint, &error)),
    }
}

/// Opens a connection to the (one) node of `settings` and declares `topology`
/// on it, both bounded; a connection whose declaration failed is closed.
pub(super) async fn open_and_declare(
    settings: &AmqpSettings,
    topology: &Topology,
) -> Result<Connection, ConnectError> {
    let connection = open(settings).await?;
    match declare_bounded(settings, &connection, topology).await {
        Ok(()) => Ok(connection),
        Err(error) => {
            // Do not leave a half-declared connection behind.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                connection.close(200, "topology declaration failed".into()),
            )
            .await;
            Err(error)
        }
    }
}

/// Declares within the connect timeout: a connection dying mid-declare must not
/// leave the supervisor waiting forever.
async fn declare_bounded(
    settings: &AmqpSettings,
    connection: &Connection,
    topology: &Topology,
) -> Result<(), ConnectError> {
    match tokio::time::timeout(
        settings.connect_timeout,
        declare(settings, connection, topology),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Timeout {
            endpoint: format!("{}:{}", settings.host(), settings.port()),
            timeout: settings.connect_timeout,
        }),
    }
}

async fn declare(
    settings: &AmqpSettings,
    connection: &Connection,
    topology: &Topology,
) -> Result<(), ConnectError> {
    let fail = |e: lapin::Error| ConnectError::Topology {
        endpoint: format!("{}:{}", settings.host(), settings.port()),
        reason: e.to_string(),
    };
    topology.declare(connection).await.map_err(fail)
}
