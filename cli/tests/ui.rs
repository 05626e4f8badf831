//! The flow page end to end: `membrane lab up` (a unique lab, the page on a free loopback
//! port), real traffic in the pods (an allowed request, a dropped one, an HTTP 403 from the
//! proxy, a DNS lookup through the DNS proxy), then the page's JSON, and the page itself
//! rendered by headless Chromium: a screenshot whose pixels carry the verdict colours of the
//! map's edges and the table's rows (and, with a FORWARDED-only filter, no dropped colour at
//! all), and the rendered DOM with the pods and a DROPPED row. `lab down` leaves nothing.
//!
//! Needs root (the lab) and Debian's `chromium` (`cargo xtask bootstrap` installs it). Without
//! chromium the test fails, unless `MEMBRANE_UI_TEST_NO_BROWSER=1` says to check only the JSON.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use membrane_tests::{require_root, unique_name};
use serde_json::Value;

/// The page's CSS colours (`observer/ui/style.css`, `membrane_observer::ui::CLASS_COLOURS`).
const FORWARDED: [u8; 3] = [0x1e, 0x8e, 0x3e];
const DROPPED: [u8; 3] = [0xd9, 0x30, 0x25];
const L7_DENIED: [u8; 3] = [0xe3, 0x74, 0x00];
const WINDOW: (u32, u32) = (1600, 1000);

struct Lab {
    name: String,
}

impl Lab {
    fn membrane(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_membrane"))
            .args(args)
            .env("MEMBRANE_LAB_NAME", &self.name)
            .output()
            .expect("run membrane")
    }

    /// `membrane lab exec POD -- CMD...`, bounded so a hung command fails the test.
    fn exec(&self, pod: &str, cmd: &[&str]) -> (Option<i32>, String) {
        let mut args = vec!["lab", "exec", pod, "--", "timeout", "20"];
        args.extend_from_slice(cmd);
        let out = self.membrane(&args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(format!("/run/membrane/{}/pids", self.name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn down_and_check_nothing_left(&self) {
        let pids = self.pids();
        assert!(!pids.is_empty(), "the lab recorded its processes");
        let down = self.membrane(&["lab", "down"]);
        assert!(down.status.success(), "{}", text(&down));
        for dir in ["/run/netns", "/etc/netns"] {
            let left: Vec<String> = std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with(&self.name))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(left, Vec::<String>::new(), "left in {dir}");
        }
        assert!(!Path::new("/sys/fs/bpf/membrane").join(&self.name).exists());
        assert!(!Path::new("/run/membrane").join(&self.name).exists());
        let alive: Vec<i32> = pids
            .into_iter()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        assert!(alive.is_empty(), "processes of the run alive: {alive:?}");
        assert!(text(&self.membrane(&["lab", "down"])).contains("nothing to remove"));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Also on a failed assertion: stop processes, remove namespaces and pins.
        let _ = self.membrane(&["lab", "down"]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One HTTP/1.1 GET over loopback: (status, content type, body).
fn get(addr: SocketAddr, target: &str) -> (u16, String, String) {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        conn,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).expect("read the answer");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

fn get_json(addr: SocketAddr, target: &str) -> Value {
    let (status, _, body) = get(addr, target);
    assert_eq!(status, 200, "{target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

fn flows(addr: SocketAddr, query: &str) -> Vec<Value> {
    get_json(addr, &format!("/api/flows?limit=4095&{query}"))["flows"]
        .as_array()
        .expect("flows")
        .clone()
}

/// Whether some flow satisfies `what`.
fn has(flows: &[Value], what: impl Fn(&Value) -> bool) -> bool {
    flows.iter().any(what)
}

fn is_between(f: &Value, src_pod: &str, dst_pod: &str, dport: u64) -> bool {
    f["source"]["pod"] == src_pod
        && f["destination"]["pod"] == dst_pod
        && f["destination"]["port"] == dport
}

/// Runs chromium headless, bounded by `timeout`, with a profile under `dir`.
fn chromium(dir: &Path, args: &[String]) -> Output {
    Command::new("timeout")
        .arg("90")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        // Enough virtual time for the page's first polls and their drawing.
        .arg("--virtual-time-budget=6000")
        .args(args)
        .output()
        .expect("run chromium")
}

/// A screenshot of `url`: its size and how many pixels have each of `colours` exactly.
fn screenshot(
    dir: &Path,
    file: &str,
    url: &str,
    colours: &[[u8; 3]],
) -> (PathBuf, (u32, u32), Vec<usize>) {
    let path = dir.join(file);
    let out = chromium(
        dir,
        &[format!("--screenshot={}", path.display()), url.to_owned()],
    );
    assert!(
        out.status.success() && path.exists(),
        "chromium --screenshot failed: {}",
        text(&out)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&path).expect("open the screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("decode the PNG");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels = &buf[..info.buffer_size()];
    let counts = colours
        .iter()
        .map(|c| {
            pixels
                .chunks_exact(channels)
                .filter(|p| p[..3] == c[..])
                .count()
        })
        .collect();
    (path, (info.width, info.height), counts)
}

#[test]
fn flow_page_shows_lab_flows_in_headless_chromium() {
    require_root();
    let browser = Command::new("chromium").arg("--version").output();
    let browser_ok = browser.as_ref().is_ok_and(|o| o.status.success());
    let skip_browser = std::env::var("MEMBRANE_UI_TEST_NO_BROWSER").is_ok_and(|v| v == "1");
    assert!(
        browser_ok || skip_browser,
        "chromium is not installed: `cargo xtask bootstrap` (apt-get install chromium) installs it; \
         MEMBRANE_UI_TEST_NO_BROWSER=1 checks only the JSON"
    );

    let lab = Lab {
        name: unique_name("ui"),
    };
    let up = lab.membrane(&["lab", "up", "--nodes", "1", "--ui-listen", "127.0.0.1:0"]);
    let out = text(&up);
    assert!(up.status.success(), "lab up failed:\n{out}");
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("flow page: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("lab up printed no flow page URL:\n{out}"))
        .to_owned();
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/ui"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("bad URL {url}"));
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    println!("flow page: {url}");

    // Real traffic under the seed policies.
    assert_eq!(
        lab.exec(
            "frontend",
            &["curl", "-s", "--max-time", "5", "http://10.200.0.11:8080/"]
        ),
        (Some(0), "hello from backend".to_owned())
    );
    assert_eq!(
        lab.exec(
            "frontend",
            &["curl", "-s", "--max-time", "2", "http://10.200.0.11:9090/"]
        )
        .0,
        Some(28),
        "backend:9090 is dropped (a timeout)"
    );
    assert_eq!(
        lab.exec(
            "frontend",
            &[
                "curl",
                "-s",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "DELETE",
                "http://10.200.1.12:8080/api/v1/orders/42"
            ]
        ),
        (Some(0), "403".to_owned())
    );
    assert_eq!(
        lab.exec(
            "frontend",
            &["dig", "+short", "backend.default.svc.cluster.local"]
        ),
        (Some(0), "10.200.0.11".to_owned())
    );

    // The flows reach the ring asynchronously (the proxies' records, the datapath's ring
    // buffer): wait, bounded, until each kind is there.
    let allowed = |f: &Value| {
        is_between(f, "frontend", "backend", 8080)
            && f["verdict"] == "FORWARDED"
            && f["l7"].is_null()
    };
    let dropped = |f: &Value| {
        is_between(f, "frontend", "backend", 9090)
            && f["verdict"] == "DROPPED"
            && f["drop_reason"] == "POLICY_DENIED"
            && f["drop_reason_text"] == "Policy denied"
            && f["traffic_direction"] == "INGRESS"
    };
    let denied = |f: &Value| {
        f["l7"]["http"]["method"] == "DELETE"
            && f["l7"]["http"]["path"] == "/api/v1/orders/42"
            && f["l7"]["type"] == "REQUEST"
            && f["verdict"] == "DROPPED"
            && f["class"] == "l7-denied"
            && f["source"]["pod"] == "frontend"
            && f["destination"]["pod"] == "api"
    };
    let forbidden = |f: &Value| f["l7"]["http"]["code"] == 403 && f["is_reply"] == true;
    let lookup = |f: &Value| {
        f["l7"]["dns"]["query"] == "backend.default.svc.cluster.local."
            && f["source"]["pod"] == "frontend"
            && f["destination"]["pod"] == "kube-dns"
            && f["destination"]["namespace"] == "kube-system"
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        let all = flows(addr, "");
        let missing: Vec<&str> = [
            ("allowed", has(&all, allowed)),
            ("dropped", has(&all, dropped)),
            ("L7 denied", has(&all, denied)),
            ("403 response", has(&all, forbidden)),
            ("DNS lookup", has(&all, lookup)),
        ]
        .into_iter()
        .filter(|(_, found)| !found)
        .map(|(what, _)| what)
        .collect();
        if missing.is_empty() {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "flows missing after 20 s: {missing:?}\n{}",
            serde_json::to_string_pretty(&all).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let summary = all
        .iter()
        .find(|f| dropped(f))
        .and_then(|f| f["summary"].as_str())
        .unwrap_or_default();
    assert!(summary.contains("TCP Flags: SYN"), "{summary}");

    // Server-side filters, with Hubble's semantics.
    let only_dropped = flows(addr, "verdict=dropped&namespace=default");
    assert!(has(&only_dropped, dropped) && has(&only_dropped, denied));
    assert!(only_dropped.iter().all(|f| f["verdict"] == "DROPPED"));
    let deletes = flows(addr, "http_method=DELETE&http_path=/api/.*");
    assert!(
        !deletes.is_empty()
            && deletes
                .iter()
                .all(|f| f["l7"]["http"]["method"] == "DELETE")
    );
    let dns = flows(addr, "protocol=dns&pod=frontend");
    assert!(has(&dns, lookup) && dns.iter().all(|f| !f["l7"]["dns"].is_null()));
    let searched = flows(addr, "q=orders/42");
    assert!(has(&searched, denied) && !has(&searched, dropped));
    let newest = get_json(addr, "/api/flows?limit=1");
    let next = newest["next"].as_u64().expect("next");
    assert_eq!(
        get_json(addr, &format!("/api/flows?since={next}"))["flows"],
        Value::Array(vec![]),
        "nothing after the newest"
    );
    for (target, status) in [
        ("/api/flows?verdict=SOMETIMES", 400),
        ("/api/flows?colour=red", 400),
        ("/api/flows?since=-1", 400),
        ("/nothing", 404),
    ] {
        let (got, content_type, body) = get(addr, target);
        assert_eq!(
            (got, content_type.as_str()),
            (status, "application/json"),
            "{target}: {body}"
        );
        assert!(body.contains("\"error\""), "{body}");
    }

    // The service map: workloads and verdict-coloured edges.
    let map = get_json(addr, "/api/map");
    let edge = |src: &str, dst: &str, class: &str| {
        map["edges"].as_array().expect("edges").iter().any(|e| {
            e["source"] == src
                && e["target"] == dst
                && e["class"] == class
                && e["count"].as_u64() >= Some(1)
        })
    };
    assert!(
        edge("default/frontend", "default/backend", "forwarded"),
        "{map}"
    );
    assert!(
        edge("default/frontend", "default/backend", "dropped"),
        "{map}"
    );
    assert!(
        edge("default/frontend", "default/api", "l7-denied"),
        "{map}"
    );
    assert!(
        edge("default/frontend", "kube-system/kube-dns", "forwarded"),
        "{map}"
    );

    let (status, content_type, page) = get(addr, "/ui");
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/html; charset=utf-8")
    );
    assert!(page.contains("<svg id=\"map\"") && page.contains("--dropped: #d93025;"));

    if !browser_ok {
        println!("chromium not installed: MEMBRANE_UI_TEST_NO_BROWSER=1, browser checks skipped");
        lab.down_and_check_nothing_left();
        return;
    }
    let dir = std::env::temp_dir().join(unique_name("ui-shots"));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let (path, size, counts) =
        screenshot(&dir, "flows.png", &url, &[FORWARDED, DROPPED, L7_DENIED]);
    println!(
        "screenshot {} ({}x{}): forwarded {} px, dropped {} px, l7-denied {} px",
        path.display(),
        size.0,
        size.1,
        counts[0],
        counts[1],
        counts[2]
    );
    assert_eq!(size, WINDOW, "screenshot size");
    // An edge (3 px wide, hundreds long), badges in the table and a legend swatch each.
    assert!(
        counts[0] >= 300,
        "forwarded colour: {} px in {}",
        counts[0],
        path.display()
    );
    assert!(
        counts[1] >= 300,
        "dropped colour: {} px in {}",
        counts[1],
        path.display()
    );
    assert!(
        counts[2] >= 100,
        "l7-denied colour: {} px in {}",
        counts[2],
        path.display()
    );

    // The colours come from the flows: with only forwarded flows shown, no red at all.
    let (path, _, counts) = screenshot(
        &dir,
        "forwarded-only.png",
        &format!("{url}?verdict=FORWARDED"),
        &[FORWARDED, DROPPED, L7_DENIED],
    );
    println!(
        "screenshot {} (verdict=FORWARDED): forwarded {} px, dropped {} px, l7-denied {} px",
        path.display(),
        counts[0],
        counts[1],
        counts[2]
    );
    assert!(counts[0] >= 300, "forwarded colour: {} px", counts[0]);
    assert_eq!(
        (counts[1], counts[2]),
        (0, 0),
        "no dropped/denied colour when filtered out"
    );

    // The DOM the page's script built: the pods on the map and in the table, a DROPPED row.
    let out = chromium(&dir, &["--dump-dom".to_owned(), url.clone()]);
    assert!(out.status.success(), "chromium --dump-dom: {}", text(&out));
    let dom = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "data-id=\"default/frontend\"",
        "data-id=\"default/backend\"",
        "data-id=\"default/api\"",
        "data-id=\"kube-system/kube-dns\"",
        "default/frontend:",
        "default/backend:9090",
        "class=\"edge c-dropped\"",
        "class=\"edge c-l7-denied\"",
        "DELETE /api/v1/orders/42",
        "DNS backend.default.svc.cluster.local.",
    ] {
        assert!(
            dom.contains(needle),
            "rendered DOM lacks {needle:?}:\n{dom}"
        );
    }
    let dropped_row = dom
        .split("<tr ")
        .find(|row| {
            row.contains("data-verdict=\"DROPPED\"") && row.contains("default/backend:9090")
        })
        .unwrap_or_else(|| panic!("no DROPPED row to backend:9090 in:\n{dom}"));
    assert!(
        dropped_row.contains(">DROPPED</span>") && dropped_row.contains("Policy denied"),
        "{dropped_row}"
    );
    println!("screenshots kept in {}", dir.display());

    lab.down_and_check_nothing_left();
}
