//! `tether certs`: a small CA for a fleet's mTLS. It makes the CA, the
//! controller's server certificate, and client certificates whose URI SAN
//! is the identity the controller checks: `spiffe://tether/node/<id>`,
//! `spiffe://tether/nodes/<prefix>` for a group of nodes sharing one
//! certificate (a Deployment's pods), `spiffe://tether/operator/<name>`.
//! Files are PEM, keys written with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::grpc::{NODE_GROUP_PREFIX, NODE_PREFIX, OPERATOR_PREFIX};

#[derive(Args)]
pub struct CertsArgs {
    /// Directory holding ca.pem and ca-key.pem; new files are written here.
    #[arg(long, global = true, default_value = ".")]
    dir: PathBuf,
    /// Validity in days.
    #[arg(long, global = true, default_value_t = 365)]
    days: u32,
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// A new CA: ca.pem and ca-key.pem (refuses to overwrite them).
    Ca {
        #[arg(long, default_value = "tether fleet CA")]
        name: String,
    },
    /// The controller's server certificate: controller.pem, controller-key.pem.
    Controller {
        /// DNS names (or IP addresses) nodes and operators use to reach it.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
    /// A node's client certificate: node-ID.pem (or, with --group, one for
    /// every node whose id starts with ID: nodes-ID.pem).
    Node {
        id: String,
        #[arg(long)]
        group: bool,
    },
    /// An operator's client certificate for `tether fleet`: operator-NAME.pem.
    Operator { name: String },
}

pub fn run(args: CertsArgs) -> ExitCode {
    match issue(&args) {
        Ok(written) => {
            for path in written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("tether certs: {message}");
            ExitCode::FAILURE
        }
    }
}

fn issue(args: &CertsArgs) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let (file, params) = match &args.command {
        CertsCommand::Ca { name } => return make_ca(&args.dir, name, args.days),
        CertsCommand::Controller { names } => {
            let mut params = CertificateParams::new(names.clone()).map_err(|e| e.to_string())?;
            params
                .distinguished_name
                .push(DnType::CommonName, &names[0]);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            ("controller".to_owned(), params)
        }
        CertsCommand::Node { id, group } => {
            let (prefix, file) = if *group {
                (NODE_GROUP_PREFIX, format!("nodes-{id}"))
            } else {
                (NODE_PREFIX, format!("node-{id}"))
            };
            (file, client_params(&format!("{prefix}{id}"), id)?)
        }
        CertsCommand::Operator { name } => (
            format!("operator-{name}"),
            client_params(&format!("{OPERATOR_PREFIX}{name}"), name)?,
        ),
    };
    let mut params = params;
    validity(&mut params, args.days);
    let issuer = load_ca(&args.dir)?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    let cert_path = args.dir.join(format!("{file}.pem"));
    let key_path = args.dir.join(format!("{file}-key.pem"));
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok(vec![cert_path, key_path])
}

fn client_params(uri: &str, common_name: &str) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let uri = uri
        .to_owned()
        .try_into()
        .map_err(|_| format!("{uri:?} is not a valid URI"))?;
    params.subject_alt_names.push(SanType::URI(uri));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// From an hour ago (clock skew) to `days` from now.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn make_ca(dir: &Path, name: &str, days: u32) -> Result<Vec<PathBuf>, String> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    if cert_path.exists() || key_path.exists() {
        return Err(format!(
            "{} already holds a CA; refusing to replace it",
            dir.display()
        ));
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    write(&cert_path, &cert.pem(), false)?;
    write(&key_path, &key.serialize_pem(), true)?;
    Ok(vec![cert_path, key_path])
}

fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, String> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "{}: {e} (make a CA first: tether certs --dir {} ca)",
                path.display(),
                dir.display()
            )
        })
    };
    let key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(|e| format!("ca-key.pem: {e}"))?;
    Issuer::from_ca_cert_pem(&read("ca.pem")?, key).map_err(|e| format!("ca.pem: {e}"))
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}
