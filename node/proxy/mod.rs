//! Forward proxying for clients that name their own destination: the HTTP
//! forward proxy (`forward`: absolute-form requests and CONNECT) and
//! SOCKS5 (`socks5`). Both share who may use them (`users`) and where they
//! may go (`policy`). By default a destination on a private, loopback or
//! link-local address is refused unless an `allow` rule names it, so a node
//! is never an open door into its own network.

pub mod forward;
pub mod policy;
pub mod socks5;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ProxySettings;
pub use policy::{Destination, Refusal};

/// Checks a user name and password against the configured users.
/// Every user is compared, in constant time, so timing tells nothing.
pub fn authenticate(settings: &ProxySettings, name: &[u8], password: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let mut found = subtle::Choice::from(0);
    for (n, p) in &settings.users {
        found |= n.as_bytes().ct_eq(name) & p.as_bytes().ct_eq(password);
    }
    found.into()
}

/// Resolves and checks `destination`, then connects to the first allowed
/// address that answers within the connect timeout.
pub async fn connect(
    settings: &ProxySettings,
    destination: &Destination,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let addrs = policy::resolve(settings, destination).await?;
    let mut last = String::new();
    for addr in addrs {
        match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: no answer within {:?}", settings.connect_timeout),
        }
    }
    Err(Refusal::Unreachable(last))
}

/// How long a client has to finish a SOCKS5 handshake or send its request head.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
