//! The one-line handshake before HTTP/2 starts on a tunnel connection:
//! the dialing node says who it is and what it offers, the public node
//! answers yes or why not. Lines are JSON, read byte by byte so that no
//! byte of the HTTP/2 that follows is consumed here.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A handshake line longer than this is refused.
const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The dialing node's `[node] id`; its certificate must name it.
    pub node: String,
    /// The `[[tunnel]]` name.
    pub tunnel: String,
    pub services: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    /// Why the tunnel is refused; none when it is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub async fn write<S, T>(stream: &mut S, value: &T) -> Result<(), String>
where
    S: AsyncWrite + Unpin,
    T: Serialize,
{
    let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("cannot send the handshake: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("cannot send the handshake: {e}"))
}

pub async fn read<S, T>(stream: &mut S) -> Result<T, String>
where
    S: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut line = Vec::with_capacity(256);
    loop {
        let byte = stream.read_u8().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                "the peer closed the connection during the handshake".to_owned()
            }
            _ => format!("cannot read the handshake: {e}"),
        })?;
        if byte == b'\n' {
            break;
        }
        if line.len() == MAX_LINE {
            return Err(format!("handshake line longer than {MAX_LINE} bytes"));
        }
        line.push(byte);
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed handshake: {e}"))
}
