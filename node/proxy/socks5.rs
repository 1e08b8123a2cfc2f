//! SOCKS5 (RFC 1928) CONNECT, with no authentication or RFC 1929
//! username/password when users are configured; IPv4, IPv6 and domain
//! destinations. A malformed handshake gets the protocol's error reply, if
//! it has one, and a closed connection.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stream::ClientStream;

use super::{authenticate, connect, Destination, Refusal, HANDSHAKE_TIMEOUT};
use crate::config::ProxySettings;
use crate::lifecycle::ConnectionGuard;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

pub struct Socks5Proxy {
    settings: ProxySettings,
}

impl Socks5Proxy {
    pub fn new(settings: ProxySettings) -> Self {
        Socks5Proxy { settings }
    }

    pub async fn serve_connection(
        self: std::sync::Arc<Self>,
        mut client: ClientStream,
        peer: SocketAddr,
        connection: ConnectionGuard,
    ) {
        let lifecycle = connection.lifecycle().clone();
        let session = async {
            let destination =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut client)).await {
                    Ok(Ok(destination)) => destination,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "SOCKS5 handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let (upstream, _) = match connect(&self.settings, &destination).await {
                Ok(connected) => connected,
                Err(refusal) => {
                    tracing::info!(%peer, %destination, ?refusal, "SOCKS5 CONNECT refused");
                    let code = match refusal {
                        Refusal::Denied(_) => Reply::NotAllowed,
                        Refusal::Unresolvable(_) => Reply::HostUnreachable,
                        Refusal::Unreachable(_) => Reply::ConnectionRefused,
                    };
                    let _ = reply(&mut client, code, None).await;
                    return;
                }
            };
            if reply(&mut client, Reply::Succeeded, upstream.local_addr().ok())
                .await
                .is_err()
            {
                return;
            }
            crate::relay::run(client, upstream, self.settings.idle_timeout, peer).await;
        };
        tokio::select! {
            _ = session => {}
            _ = lifecycle.killed() => {}
        }
    }

    /// Method negotiation, authentication and the request; answers where
    /// the client wants to go.
    async fn handshake(&self, client: &mut ClientStream) -> io::Result<Destination> {
        let [version, count] = read_array(client).await?;
        if version != VERSION {
            return Err(invalid("not SOCKS version 5"));
        }
        let mut methods = vec![0u8; usize::from(count)];
        client.read_exact(&mut methods).await?;
        let required = if self.settings.users.is_empty() {
            NO_AUTH
        } else {
            USER_PASSWORD
        };
        if !methods.contains(&required) {
            client.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
            return Err(invalid("no acceptable authentication method"));
        }
        client.write_all(&[VERSION, required]).await?;
        if required == USER_PASSWORD {
            let [auth_version, name_len] = read_array(client).await?;
            if auth_version != 1 {
                return Err(invalid("bad username/password negotiation version"));
            }
            let mut name = vec![0u8; usize::from(name_len)];
            client.read_exact(&mut name).await?;
            let [password_len] = read_array(client).await?;
            let mut password = vec![0u8; usize::from(password_len)];
            client.read_exact(&mut password).await?;
            let ok = authenticate(&self.settings, &name, &password);
            client.write_all(&[1, if ok { 0 } else { 1 }]).await?;
            if !ok {
                return Err(invalid("bad credentials"));
            }
        }
        let [version, command, _reserved, address_type] = read_array(client).await?;
        if version != VERSION {
            reply(client, Reply::GeneralFailure, None).await?;
            return Err(invalid("bad request version"));
        }
        if command != CMD_CONNECT {
            reply(client, Reply::CommandNotSupported, None).await?;
            return Err(invalid("only CONNECT is supported"));
        }
        let destination = match address_type {
            1 => {
                let octets: [u8; 4] = read_array(client).await?;
                let port = u16::from_be_bytes(read_array(client).await?);
                Destination::Addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), port))
            }
            4 => {
                let octets: [u8; 16] = read_array(client).await?;
                let port = u16::from_be_bytes(read_array(client).await?);
                Destination::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
            }
            3 => {
                let [len] = read_array(client).await?;
                let mut name = vec![0u8; usize::from(len)];
                client.read_exact(&mut name).await?;
                let port = u16::from_be_bytes(read_array(client).await?);
                let parsed = std::str::from_utf8(&name)
                    .ok()
                    .and_then(|name| Destination::parse(name, port));
                let Some(destination) = parsed else {
                    reply(client, Reply::NotAllowed, None).await?;
                    return Err(invalid("not a host name"));
                };
                destination
            }
            _ => {
                reply(client, Reply::AddressTypeNotSupported, None).await?;
                return Err(invalid("unknown address type"));
            }
        };
        Ok(destination)
    }
}

async fn read_array<const N: usize>(client: &mut ClientStream) -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    client.read_exact(&mut bytes).await?;
    Ok(bytes)
}

async fn reply(
    client: &mut ClientStream,
    code: Reply,
    bound: Option<SocketAddr>,
) -> io::Result<()> {
    let bound = bound.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut message = vec![VERSION, code as u8, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            message.push(1);
            message.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            message.push(4);
            message.extend_from_slice(&ip.octets());
        }
    }
    message.extend_from_slice(&bound.port().to_be_bytes());
    client.write_all(&message).await
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}
