//! `weft ctl`: reads a running daemon's admin endpoint and prints tables, or asks it to
//! explain a decision. Only reads; never changes the daemon.

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// What to show.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Workloads with enrollment, node, identity and addresses.
    Workloads,
    /// Services with VIPs, ports and endpoints.
    Services,
    /// Security policies in force.
    Policies,
    /// Workload certificates held by this node.
    Certs,
    /// Live connections and pooled HBONE connections.
    Connections,
    /// Would a connection be allowed, and why (no traffic is sent).
    Explain {
        /// Client IP.
        #[arg(long)]
        src: String,
        /// Destination IP (or IP:port).
        #[arg(long)]
        dst: String,
        /// Destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Client identity (default: the identity of the workload at `src`, if enrolled).
        #[arg(long)]
        identity: Option<String>,
        /// Treat the client as plaintext (no mTLS).
        #[arg(long)]
        plaintext: bool,
        /// L7: the HTTP method of the request to explain.
        #[arg(long)]
        method: Option<String>,
        /// L7: the request path (and query).
        #[arg(long)]
        path: Option<String>,
        /// L7: the Host / :authority.
        #[arg(long)]
        host: Option<String>,
        /// L7: a request header `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// L7: a JWT sent as `Authorization: Bearer`.
        #[arg(long)]
        token: Option<String>,
        /// Print the full JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Errors talking to the admin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Could not connect or the exchange failed.
    #[error("admin endpoint {addr}: {reason}")]
    Http {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The daemon answered with an error.
    #[error("{path}: {status}: {body}")]
    Status {
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// Its message.
        body: String,
    },
    /// The answer was not the expected JSON.
    #[error("{path}: unexpected answer: {0}", path = .1)]
    Json(serde_json::Error, String),
}

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), CtlError> {
    let fail = |reason: String| CtlError::Http { addr, reason };
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| fail("connect timed out".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn get_json(addr: SocketAddr, path: &str) -> Result<Value, CtlError> {
    let (status, body) = get(addr, path).await?;
    if status != 200 {
        return Err(CtlError::Status {
            path: path.into(),
            status,
            body: body.trim().into(),
        });
    }
    serde_json::from_str(&body).map_err(|e| CtlError::Json(e, path.into()))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Formats rows as aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{:<w$}  ", c, w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in &rows {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

/// The objects of the array `d[key]`, each made into a row by `row`.
fn rows_of(d: &Value, key: &str, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    d[key]
        .as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default()
}

/// The fields `names` of `v`, as cells.
fn cells(v: &Value, names: &[&str]) -> Vec<String> {
    names.iter().map(|n| s(&v[*n])).collect()
}

/// Runs one ctl command against the admin endpoint at `addr`; returns what to print.
pub async fn run(addr: SocketAddr, cmd: CtlCommand) -> Result<String, CtlError> {
    Ok(match cmd {
        CtlCommand::Workloads => {
            let d = get_json(addr, "/config_dump").await?;
            let rows = rows_of(&d, "workloads", |w| {
                cells(
                    w,
                    &[
                        "namespace",
                        "name",
                        "node",
                        "enrollment",
                        "workloadIps",
                        "identity",
                    ],
                )
            });
            table(
                &["NAMESPACE", "NAME", "NODE", "ENROLLMENT", "IPS", "IDENTITY"],
                rows,
            )
        }
        CtlCommand::Services => {
            let d = get_json(addr, "/config_dump").await?;
            let rows = d["services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    let ports: Vec<String> = v["portsDetail"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .map(|p| {
                            format!(
                                "{}->{}",
                                s(&p["port"]),
                                s(&p["targetPort"]).trim_matches(|c| c == '{' || c == '}')
                            )
                        })
                        .collect();
                    vec![
                        s(&v["namespace"]),
                        s(&v["name"]),
                        s(&v["vips"]),
                        ports.join(","),
                        v["endpoints"]
                            .as_object()
                            .map(|e| e.len())
                            .unwrap_or(0)
                            .to_string(),
                    ]
                })
                .collect();
            table(&["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS"], rows)
        }
        CtlCommand::Policies => {
            let d = get_json(addr, "/config_dump").await?;
            let rows = d["meshPolicies"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|p| {
                    let spec = &p["spec"];
                    let detail = match p["kind"].as_str() {
                        Some("authorizationPolicy") => format!(
                            "{} rules={}",
                            s(&spec["action"]),
                            spec["rules"].as_array().map(|r| r.len()).unwrap_or(0)
                        ),
                        Some("peerAuthentication") => format!("mtls={}", s(&spec["mtls"]["mode"])),
                        _ => format!(
                            "jwtRules={}",
                            spec["jwtRules"].as_array().map(|r| r.len()).unwrap_or(0)
                        ),
                    };
                    let selector = spec["selector"]["matchLabels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| format!("{k}={}", s(v)))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_else(|| "-".into());
                    vec![
                        s(&p["kind"]),
                        s(&p["namespace"]),
                        s(&p["name"]),
                        selector,
                        detail,
                    ]
                })
                .collect();
            table(&["KIND", "NAMESPACE", "NAME", "SELECTOR", "DETAIL"], rows)
        }
        CtlCommand::Certs => {
            let d = get_json(addr, "/config_dump").await?;
            let rows = rows_of(&d, "certificates", |c| {
                cells(c, &["identity", "serial", "notBefore", "notAfter"])
            });
            table(&["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER"], rows)
        }
        CtlCommand::Connections => {
            let d = get_json(addr, "/connections").await?;
            let rows = rows_of(&d, "connections", |c| {
                let mut r = cells(
                    c,
                    &[
                        "direction",
                        "protocol",
                        "src",
                        "dst",
                        "srcIdentity",
                        "dstIdentity",
                        "bytesReceived",
                        "bytesSent",
                    ],
                );
                r.push(format!("{:.1}s", c["ageSecs"].as_f64().unwrap_or(0.0)));
                r
            });
            let mut out = table(
                &[
                    "DIRECTION",
                    "PROTOCOL",
                    "SRC",
                    "DST",
                    "SRC IDENTITY",
                    "DST IDENTITY",
                    "RECEIVED",
                    "SENT",
                    "AGE",
                ],
                rows,
            );
            let rows = rows_of(&d, "pool", |p| {
                cells(p, &["srcIdentity", "dstIdentity", "peer", "streams"])
            });
            out.push_str(&format!("\n{} pooled HBONE connection(s)\n", rows.len()));
            out.push_str(&table(
                &["SRC IDENTITY", "DST IDENTITY", "PEER", "STREAMS"],
                rows,
            ));
            out
        }
        CtlCommand::Explain {
            src,
            dst,
            port,
            identity,
            plaintext,
            json,
            method,
            path,
            host,
            headers,
            token,
        } => {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("src", &src).append_pair("dst", &dst);
            if let Some(p) = port {
                q.append_pair("port", &p.to_string());
            }
            if let Some(i) = &identity {
                q.append_pair("identity", i);
            }
            if plaintext {
                q.append_pair("plaintext", "true");
            }
            for (k, v) in [
                ("method", &method),
                ("path", &path),
                ("host", &host),
                ("token", &token),
            ] {
                if let Some(v) = v {
                    q.append_pair(k, v);
                }
            }
            for h in &headers {
                q.append_pair("header", h);
            }
            let v = get_json(addr, &format!("/debug/explain?{}", q.finish())).await?;
            if json {
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
            } else {
                explain_text(&v)
            }
        }
    })
}

fn explain_text(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", s(&v["summary"]));
    let _ = writeln!(
        out,
        "  source:      {} (identity {})",
        s(&v["source"]["ip"]),
        s(&v["source"]["identity"])
    );
    let _ = writeln!(
        out,
        "  destination: {}:{} ({})",
        s(&v["destination"]["ip"]),
        s(&v["destination"]["port"]),
        s(&v["destination"]["workload"])
    );
    if !v["jwt"].is_null() {
        let _ = writeln!(
            out,
            "  request:     {}",
            serde_json::to_string(&v["request"]).unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  JWT:         {}",
            serde_json::to_string(&v["jwt"]).unwrap_or_default()
        );
        let _ = writeln!(out, "  waypoint:    {}", s(&v["waypoint"]));
    }
    let m = &v["mtls"];
    let _ = writeln!(
        out,
        "  mTLS:        {} ({})",
        s(&m["mode"]),
        serde_json::to_string(&m["policy"]).unwrap_or_default()
    );
    if !v["mtlsNote"].is_null() {
        let _ = writeln!(out, "               {}", s(&v["mtlsNote"]));
    }
    let policies = v["policies"].as_array().cloned().unwrap_or_default();
    if policies.is_empty() {
        let _ = writeln!(out, "  no AuthorizationPolicy applies");
    }
    for p in policies {
        let r = &p["policy"];
        let _ = writeln!(
            out,
            "  {} {}/{} ({}): {}",
            s(&r["action"]),
            s(&r["namespace"]),
            s(&r["name"]),
            s(&p["scope"]),
            if p["matched"] == true {
                "matched"
            } else {
                "did not match"
            }
        );
        for rule in p["rules"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                out,
                "    rule {}: {}",
                s(&rule["index"]),
                if rule["matched"] == true {
                    "matched"
                } else {
                    "no match"
                }
            );
            for d in rule["details"].as_array().cloned().unwrap_or_default() {
                let _ = writeln!(out, "      {}", s(&d));
            }
        }
    }
    out
}
