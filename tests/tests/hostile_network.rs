//! A hostile network (issue 14, section 1), against a `--dev` daemon whose limits are turned
//! down so that the attacks end in seconds: clients that hold connections open on purpose at
//! every stage, too many connections from one address or in all, a body past its route's limit,
//! one client certificate flooding the API, and the JSON access log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use smartsign_tests::DevDaemon;
use smartsign_tests::flow::problem;

/// The limits of these tests: two seconds for a handshake or a header block, three for a body.
const TUNED: &[(&str, &str)] = &[
    ("handshake_timeout_seconds", "2"),
    ("header_timeout_seconds", "2"),
    ("body_timeout_seconds", "3"),
    ("idle_timeout_seconds", "3"),
];

fn tuned(extra: &[(&str, &str)]) -> DevDaemon {
    let mut daemon = DevDaemon::start(&[]);
    let settings: Vec<_> = TUNED.iter().chain(extra).copied().collect();
    daemon.relaunch_with_settings(&settings);
    daemon
}

fn address(url: &str) -> SocketAddr {
    url.split("://")
        .nth(1)
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Whether the server closed `socket` before `deadline` (EOF or reset), reading and dropping
/// whatever it said first.
fn closed_by(socket: &mut TcpStream, deadline: Instant) -> bool {
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn clients_that_hold_connections_open_are_cut_off_on_every_listener() {
    let daemon = tuned(&[]);
    let started = Instant::now();
    let mut sockets = Vec::new();
    // Slowloris: a partial request line on the operations and CA listeners, and sockets that
    // say nothing at all, on those and on the TLS listener (which waits for a handshake).
    for url in [&daemon.metrics, &daemon.ca] {
        for _ in 0..40 {
            let mut socket = TcpStream::connect(address(url)).unwrap();
            socket.write_all(b"GET /metr").unwrap();
            sockets.push(("partial request line", socket));
        }
    }
    for url in [&daemon.metrics, &daemon.ca, &daemon.api] {
        for _ in 0..10 {
            sockets.push(("silent", TcpStream::connect(address(url)).unwrap()));
        }
    }
    // A header trickled one byte a second never completes within the header timeout.
    let mut trickle = TcpStream::connect(address(&daemon.metrics)).unwrap();
    for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" {
        if trickle.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    sockets.push(("trickled header", trickle));
    let deadline = started + Duration::from_secs(12);
    for (what, mut socket) in sockets {
        assert!(
            closed_by(&mut socket, deadline),
            "a {what} connection was still open after {:?}",
            started.elapsed()
        );
    }
    // A partial body on an authenticated API connection: 408 after the body timeout.
    let mut slow = SlowBody::start(&daemon, "demo-a");
    let answer = slow.answer_within(Duration::from_secs(10));
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a stalled body gets 408: {answer:?}"
    );
    assert!(answer.contains("request_timeout"), "{answer}");
    // Nothing of it hurt the daemon.
    let checkpoint = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap();
    assert_eq!(checkpoint.status(), 200);
    let metrics = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains(
            "smartsign_connections_cut_total{listener=\"api\",reason=\"handshake_timeout\"}"
        ),
        "{metrics}"
    );

    // An HTTP/2 connection (its pings would keep it open) with nothing in flight is closed
    // after the idle timeout (3 s here); the client's next request opens a new one.
    let http2 = daemon
        .client_builder()
        .http2_prior_knowledge()
        .identity(identity(&daemon, "auditor"))
        .build()
        .unwrap();
    let first = http2
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap();
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    assert_eq!(first.status(), 200);
    std::thread::sleep(Duration::from_secs(5));
    let metrics = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    // Nothing is left open on the API listener: the HTTP/2 connection was cut as idle.
    assert!(
        metrics.contains("smartsign_connections_open{listener=\"api\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smartsign_connections_cut_total{listener=\"api\",reason=\"idle\"}"),
        "{metrics}"
    );
    let again = http2
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .send()
        .unwrap();
    assert_eq!(again.status(), 200);
}

/// The client certificate and key of `name`, as reqwest takes them.
fn identity(daemon: &DevDaemon, name: &str) -> reqwest::Identity {
    let clients = daemon.state_dir().join("clients");
    let mut pem = std::fs::read(clients.join(format!("{name}.pem"))).unwrap();
    pem.extend(std::fs::read(clients.join(format!("{name}.key"))).unwrap());
    reqwest::Identity::from_pem(&pem).unwrap()
}

/// An `openssl s_client` that sends the headers of a POST and a few bytes of its body as
/// `client`, then nothing more.
struct SlowBody {
    child: Child,
    output: mpsc::Receiver<Vec<u8>>,
}

impl SlowBody {
    fn start(daemon: &DevDaemon, client: &str) -> SlowBody {
        let state = daemon.state_dir();
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(address(&daemon.api).to_string())
            .arg("-cert")
            .arg(state.join(format!("clients/{client}.pem")))
            .arg("-key")
            .arg(state.join(format!("clients/{client}.key")))
            .arg("-CAfile")
            .arg(state.join("tls/ca.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_client");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"POST /v1/signing-requests HTTP/1.1\r\nHost: smartsign\r\n\
                  Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"taid\": ",
            )
            .unwrap();
        stdin.flush().unwrap();
        // stdin stays open (leaked into the thread) so that the client never finishes.
        let mut stdout = child.stdout.take().unwrap();
        let (sender, output) = mpsc::channel();
        std::thread::spawn(move || {
            let _stdin = stdin;
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buffer) {
                if n == 0 || sender.send(buffer[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        SlowBody { child, output }
    }

    /// What the server answered within `limit` (empty if nothing).
    fn answer_within(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut answer = Vec::new();
        while let Ok(chunk) = self
            .output
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            answer.extend(chunk);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }
}

impl Drop for SlowBody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn connections_are_capped_per_address_and_per_listener() {
    let daemon = tuned(&[
        ("max_connections", "8"),
        ("max_connections_per_address", "4"),
    ]);
    let metrics = address(&daemon.metrics);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // From one source address of the loopback network each.
    let connect_from = |source: &str| -> TcpStream {
        runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            let stream = socket.connect(metrics).await.unwrap().into_std().unwrap();
            // tokio's sockets are non-blocking; these are read with timeouts.
            stream.set_nonblocking(false).unwrap();
            stream
        })
    };
    let started = Instant::now();
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect_from("127.0.0.2")).collect();
    // The fifth from the same address is closed at once.
    let mut fifth = connect_from("127.0.0.2");
    assert!(
        closed_by(&mut fifth, Instant::now() + Duration::from_secs(1)),
        "a fifth connection from one address is closed at once"
    );
    held.extend((0..4).map(|_| connect_from("127.0.0.3")));
    // The listener holds 8 now: a ninth client (another address) waits in the backlog until
    // the silent ones are cut at the header timeout (2 s), then is served.
    let mut ninth = connect_from("127.0.0.4");
    ninth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    ninth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    ninth.read_to_string(&mut answer).unwrap();
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited >= Duration::from_millis(1500),
        "the ninth connection was served after {waited:?}, before any place was free"
    );
    drop(held);
    let text = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains(
            "smartsign_connections_cut_total{listener=\"operations\",reason=\"per_address\"} 1"
        ),
        "{text}"
    );
}

#[test]
fn one_client_certificate_cannot_starve_the_others() {
    let daemon = tuned(&[
        ("requests_per_second", "1"),
        ("burst", "3"),
        ("max_concurrent", "1"),
    ]);
    let auditor = daemon.client("auditor");
    let checkpoint = || {
        auditor
            .get(format!("{}/v1/audit/checkpoint", daemon.api))
            .send()
            .unwrap()
    };
    // The burst passes; a quick run past it is refused with a time to come back. (Requests
    // take milliseconds, so at most one token comes back while the burst is spent.)
    let mut passed = 0;
    let refused = loop {
        let answer = checkpoint();
        if answer.status() == 429 {
            break answer;
        }
        assert_eq!(answer.status(), 200);
        passed += 1;
        assert!(passed <= 10, "no refusal after {passed} quick requests");
    };
    assert!(
        (3..=4).contains(&passed),
        "{passed} passed before the refusal"
    );
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = refused.json().unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(body["request_id"].is_string());
    // Another certificate is not affected.
    let other = daemon
        .client("registrar")
        .get(format!("{}/v1/accounts/u-nobody", daemon.api))
        .send()
        .unwrap();
    assert_eq!(problem(other), (404, "not_found".into()));
    // After the wait it may call again.
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(checkpoint().status(), 200);

    // Concurrency: a request of demo-a that is in flight (its body stalls) takes its one
    // place; a second of demo-a is refused meanwhile, demo-b's is not.
    let mut slow = SlowBody::start(&daemon, "demo-a");
    std::thread::sleep(Duration::from_millis(500));
    let signing = |client: &str| {
        daemon
            .client(client)
            .get(format!("{}/v1/signing-requests/r-nothing", daemon.api))
            .send()
            .unwrap()
    };
    let busy = signing("demo-a");
    assert_eq!(busy.status(), 429);
    assert_eq!(busy.headers()["retry-after"], "1");
    assert_eq!(problem(signing("demo-b")), (404, "not_found".into()));
    let answer = slow.answer_within(Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    drop(slow);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(problem(signing("demo-a")), (404, "not_found".into()));
    let text = reqwest::blocking::get(format!("{}/metrics", daemon.metrics))
        .unwrap()
        .text()
        .unwrap();
    for series in [
        "smartsign_rate_limited_total{limit=\"rate\",role=\"auditor\"}",
        "smartsign_rate_limited_total{limit=\"concurrency\",role=\"service\"} 1",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
}

#[test]
fn bodies_past_the_route_limit_are_refused_unread_and_the_access_log_is_json() {
    let daemon = DevDaemon::start(&["--log-format", "json"]);
    let service = daemon.client("demo-a");
    let huge = json!({"taid": "t", "hash_algorithm": "sha256", "hash": "A".repeat(20_000)});
    let refused = service
        .post(format!("{}/v1/signing-requests", daemon.api))
        .json(&huge)
        .send()
        .unwrap();
    assert_eq!(problem(refused), (413, "payload_too_large".into()));
    // A route that takes no body takes at most a little.
    let with_body = daemon
        .client("auditor")
        .get(format!("{}/v1/audit/checkpoint", daemon.api))
        .body(vec![b' '; 4096])
        .send()
        .unwrap();
    assert_eq!(problem(with_body), (413, "payload_too_large".into()));
    let answered = daemon
        .client("registrar")
        .get(format!("{}/v1/accounts/u-json-log", daemon.api))
        .header("x-request-id", "json-log-1")
        .send()
        .unwrap();
    assert_eq!(answered.status(), 404);
    // One JSON access-log line for it: time, request id, principal and role, route template,
    // status, duration.
    let log = daemon.log();
    let line: Value = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["target"] == "smartsign::access" && line["span"]["request_id"] == "json-log-1"
        })
        .unwrap_or_else(|| panic!("no JSON access-log line for json-log-1 in\n{log}"));
    let fields = &line["fields"];
    assert!(line["timestamp"].is_string(), "{line}");
    assert_eq!(fields["principal"], "registrar:registrar", "{line}");
    assert_eq!(fields["role"], "registrar", "{line}");
    assert_eq!(fields["route"], "/v1/accounts/{id}", "{line}");
    assert_eq!(fields["status"], 404, "{line}");
    assert!(fields["duration_ms"].is_u64(), "{line}");
    assert!(
        !line.to_string().contains("u-json-log"),
        "the path with its ids stays out of the access log: {line}"
    );
}
