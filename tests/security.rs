//! Security end to end (DESIGN.md, "Security and autonomy"): who may
//! connect (TLS with client certificates), what each site and user may
//! read or lock (access rules), who looked at what (the audit trail), and
//! that values of attributes a site does not map never leave it.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use snaps_local::remote::{Auth, GlobalClient};
use snaps_proto::tls::Peer;
use snaps_proto::v1;

fn rule(relation: &str, site: &str, user: &str, right: v1::Right) -> v1::AclRule {
    v1::AclRule {
        relation: relation.into(),
        site: site.into(),
        user: user.into(),
        right: right as i32,
    }
}

/// Why a connection was refused: at connect or at its first request.
async fn refusal(addr: &str, auth: &Auth, claim: &str, fingerprint: &str) -> String {
    match GlobalClient::connect(addr, auth, Some(claim)).await {
        Err(e) => e.to_string(),
        Ok(c) => match c.hello(fingerprint).await {
            Err(e) => e.to_string(),
            Ok(h) => panic!("{claim} was let in as {}", h.site_code),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_admits_certified_sites_only_and_no_request_speaks_for_another_site() {
    let certs = tempfile::tempdir().unwrap();
    snaps::localnet::issue_certificates(certs.path(), &network()).unwrap();
    let dir = certs.path().to_path_buf();
    let net = setup_with(10, move |o| o.tls = Some(dir)).await;
    let global = net.global.as_ref().unwrap();
    assert!(global.addr.starts_with("https://"), "{}", global.addr);
    let fingerprint = net.network.global_catalog().unwrap().fingerprint();

    // The sites work over TLS: a CPH patient found at STG.
    let pno = patients(&net, "CPH")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let lookup = format!("SELECT surname FROM patient WHERE pno = {pno}");
    assert!(one(&mut stg, &lookup).await.is_some());

    // A site's own certificate: in, as that site.
    let grc = GlobalClient::connect(&global.addr, &global.site_auth("GRC").unwrap(), Some("GRC"))
        .await
        .unwrap();
    assert_eq!(grc.hello(&fingerprint).await.unwrap().site_code, "GRC");

    // STG's certificate with a request claiming to be CPH.
    let e = refusal(
        &global.addr,
        &global.site_auth("STG").unwrap(),
        "CPH",
        &fingerprint,
    )
    .await;
    assert!(
        e.contains("claims to come from site CPH") && e.contains("site STG's"),
        "{e}"
    );

    // A site's certificate is not an administrator's, nor the other way.
    let e = grc.conflicts().await.unwrap_err().to_string();
    assert!(
        e.contains("site GRC's certificate is not an administrator's"),
        "{e}"
    );
    let admin = global.admin_client().await.unwrap();
    let e = admin.hello(&fingerprint).await.unwrap_err().to_string();
    assert!(e.contains("cannot act for a site"), "{e}");

    // A certificate for CPH issued by another CA (the client trusts the
    // real controller, so only the server's check can refuse it).
    let rogue = tempfile::tempdir().unwrap();
    snaps_proto::tls::issue_network(rogue.path(), "rogue", &["127.0.0.1".into()]).unwrap();
    let forged = snaps_proto::tls::issue_site(rogue.path(), "CPH").unwrap();
    std::fs::copy(certs.path().join("ca.pem"), forged.join("ca.pem")).unwrap();
    let e = refusal(
        &global.addr,
        &Auth::tls_dir(&forged).unwrap(),
        "CPH",
        &fingerprint,
    )
    .await;
    // The server refuses the handshake (its log names the unknown issuer).
    assert!(e.contains("transport error"), "{e}");

    // No certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(certs.path().join("ca.pem")).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut bare = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    bare.alpn_protocols = vec![b"h2".to_vec()];
    let e = refusal(
        &global.addr,
        &Auth::Tls(Arc::new(bare)),
        "CPH",
        &fingerprint,
    )
    .await;
    // (Which cause the client sees first — the alert, a closed connection —
    // depends on timing; the server's log names it.)
    assert!(e.contains("transport error"), "{e}");

    // Plain text to the TLS port, with a site's token.
    let plain = global.addr.replacen("https://", "http://", 1);
    let e = refusal(
        &plain,
        &Auth::Insecure(global.tokens["CPH"].clone()),
        "CPH",
        &fingerprint,
    )
    .await;
    assert!(e.contains("transport error"), "{e}");

    // The refused connections did nothing: CPH is still served as before.
    let mut cph = connect(net.sites["CPH"]).await;
    let stg_pno = patients(&net, "STG")[0];
    assert!(
        one(
            &mut cph,
            &format!("SELECT surname FROM patient WHERE pno = {stg_pno}")
        )
        .await
        .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_rules_refuse_by_relation_site_and_user_and_every_read_and_lock_is_audited() {
    let net = setup(20).await;
    let global = net.global.as_ref().unwrap();
    let admin = global.admin_client().await.unwrap();
    let cph = patients(&net, "CPH");
    let (p1, p2, p3) = (cph[0], cph[1], cph[2]);

    // GRC may read patients but not lock them.
    let rules = admin
        .grant(rule("patient", "GRC", "", v1::Right::Read))
        .await
        .unwrap();
    assert_eq!(rules.rules.len(), 1);
    assert_eq!(rules.default_right, v1::Right::Write as i32);
    let mut grc = connect(net.sites["GRC"]).await;
    assert!(
        one(
            &mut grc,
            &format!("SELECT surname FROM patient WHERE pno = {p1}")
        )
        .await
        .is_some()
    );
    let (code, message) = refused(
        &grc,
        &format!("UPDATE patient SET title = 'Dr' WHERE pno = {p1}"),
    )
    .await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("user radiology at site GRC may not lock patient"),
        "{message}"
    );

    // No visits at all for GRC: an error naming the relation, never an
    // empty answer.
    admin
        .grant(rule("visit", "GRC", "", v1::Right::None))
        .await
        .unwrap();
    let (code, message) = refused(
        &grc,
        &format!("SELECT v.vno, v.date FROM visit v WHERE v.pno = {p2}"),
    )
    .await;
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("may not read visit"), "{message}");

    // One user at STG refused, another at the same site served.
    admin
        .grant(rule("patient", "STG", "clerk", v1::Right::None))
        .await
        .unwrap();
    let lookup = format!("SELECT surname FROM patient WHERE pno = {p3}");
    let mut clerk = connect_as(net.sites["STG"], "clerk").await;
    let (code, message) = refused(&clerk, &lookup).await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("user clerk at site STG may not read patient"),
        "{message}"
    );
    let mut radiology = connect(net.sites["STG"]).await;
    let surname = one(&mut radiology, &lookup).await.expect("served");
    // ... and may lock (the default right is write).
    run(
        &mut radiology,
        &format!("UPDATE patient SET title = 'Dr' WHERE pno = {p3}"),
    )
    .await;

    // A revoked rule gives the broader one back.
    let rules = admin
        .revoke(rule("patient", "STG", "clerk", v1::Right::Unspecified))
        .await
        .unwrap();
    assert_eq!(rules.rules.len(), 2);
    assert_eq!(
        one(&mut clerk, &lookup).await.as_deref(),
        Some(surname.as_str())
    );
    let e = admin
        .revoke(rule("patient", "STG", "clerk", v1::Right::Unspecified))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no rule for patient at site STG user clerk"),
        "{e}"
    );
    let e = admin
        .grant(rule("patients", "STG", "", v1::Right::Read))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"patients\" is not a global relation"), "{e}");

    // The audit trail: who read which patient, who locked, who was refused.
    let all = admin.audit(v1::AuditRequest::default()).await.unwrap();
    let has = |site: &str, user: &str, action: &str, relation: &str| {
        all.iter().find(|e| {
            e.site == site
                && e.user == user
                && e.action == action
                && e.relations.iter().any(|r| r == relation)
        })
    };
    let fetch = has("GRC", "radiology", "fetch", "patient").expect("GRC's fetch");
    assert!(fetch.patients.contains(&p1.to_string()), "{fetch:?}");
    assert!(fetch.tuples >= 1 && fetch.at > 0);
    assert!(has("GRC", "radiology", "lock-denied", "patient").is_some());
    assert!(has("GRC", "radiology", "fetch-denied", "visit").is_some());
    assert!(has("STG", "clerk", "fetch-denied", "patient").is_some());
    let lock = has("STG", "radiology", "lock", "patient").expect("STG's lock");
    assert_eq!(lock.tuples, 1);
    let clerk_fetch = has("STG", "clerk", "fetch", "patient");
    // The clerk's second lookup was answered from the copy STG held.
    assert!(clerk_fetch.is_none() || clerk_fetch.unwrap().tuples == 0);
    assert_eq!(
        all.iter()
            .filter(|e| e.site == "admin" && (e.action == "grant" || e.action == "revoke"))
            .count(),
        4
    );
    // Filtered by patient and by site.
    let p1_entries = admin
        .audit(v1::AuditRequest {
            patient: p1.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!p1_entries.is_empty());
    assert!(
        p1_entries
            .iter()
            .all(|e| e.patients.contains(&p1.to_string()))
    );
    let grc_entries = admin
        .audit(v1::AuditRequest {
            site: "GRC".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(grc_entries.iter().all(|e| e.site == "GRC"));
    assert!(grc_entries.len() >= 3);

    // Append-only, even for SQL on the store's file.
    let store = rusqlite::Connection::open(&net.store).unwrap();
    for sql in [
        "DELETE FROM snaps_audit",
        "UPDATE snaps_audit SET site = 'XYZ'",
    ] {
        let e = store.execute(sql, []).unwrap_err().to_string();
        assert!(e.contains("append-only"), "{sql}: {e}");
    }

    // The same through the command line.
    let token = net.dir.path().join("admin.token");
    std::fs::write(&token, &global.admin).unwrap();
    let (addr, token) = (global.addr.clone(), token.to_str().unwrap().to_string());
    let snaps = move |args: Vec<String>| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaps"))
            .args(&args)
            .args(["--global", &addr, "--insecure", "--token-file", &token])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let args = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let run_cli = {
        let snaps = snaps.clone();
        move |a: Vec<String>| {
            let snaps = snaps.clone();
            tokio::task::spawn_blocking(move || snaps(a))
        }
    };
    let (ok, out, err) = run_cli(args(
        "acl grant --relation doctor --site GRC --user RAD7 read",
    ))
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().eq(["doctor", "GRC", "RAD7", "read"])),
        "{out}"
    );
    let (ok, out, err) = run_cli(args("acl list --json")).await.unwrap();
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["default"], "write");
    assert_eq!(list["rules"].as_array().unwrap().len(), 3);
    let (ok, out, err) = run_cli(args(&format!("audit --patient {p1} --json")))
        .await
        .unwrap();
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["site"] == "GRC" && r["action"] == "fetch"),
        "{out}"
    );
    let (ok, out, err) = run_cli(args("audit --site STG --since 2000-01-01"))
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(
        out.contains("lock") && out.contains("clerk") && out.trim_end().ends_with("entries"),
        "{out}"
    );
    let (ok, _, err) = run_cli(args("acl grant --relation patients --site GRC read"))
        .await
        .unwrap();
    assert!(!ok);
    assert!(
        err.contains("\"patients\" is not a global relation"),
        "{err}"
    );
    let (ok, _, err) = run_cli(args("audit --since yesterday")).await.unwrap();
    assert!(!ok);
    assert!(err.contains("--since \"yesterday\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_trail_is_hash_chained_verified_and_read_as_fhir() {
    let net = setup(10).await;
    let global = net.global.as_ref().unwrap();
    let p1 = patients(&net, "CPH")[0];
    let mut stg = connect(net.sites["STG"]).await;
    one(
        &mut stg,
        &format!("SELECT surname FROM patient WHERE pno = {p1}"),
    )
    .await;
    let token = net.dir.path().join("admin.token");
    std::fs::write(&token, &global.admin).unwrap();
    let (addr, token) = (global.addr.clone(), token.to_str().unwrap().to_string());
    let cli = move |args: &'static str| {
        let (addr, token) = (addr.clone(), token.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_snaps"))
                .args(args.split_whitespace())
                .args(["--global", &addr, "--insecure", "--token-file", &token])
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        })
    };
    let (ok, out, err) = cli("audit --verify").await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("the audit trail's hash chain holds"), "{out}");
    assert!(out.contains(", 0 not chained yet"), "{out}");

    // FHIR AuditEvents: the fetch is an export naming the patient.
    let (ok, out, err) = cli("audit --fhir").await.unwrap();
    assert!(ok, "{err}");
    let bundle: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    let events: Vec<&serde_json::Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .collect();
    assert!(events.iter().all(|e| e["resourceType"] == "AuditEvent"));
    let fetch = events
        .iter()
        .find(|e| {
            e["subtype"][0]["code"] == "fetch" && e["agent"][0]["who"]["display"] == "radiology@STG"
        })
        .unwrap_or_else(|| panic!("no fetch by STG: {out}"));
    assert_eq!(fetch["type"]["code"], "110106");
    assert_eq!(fetch["outcome"], "0");
    assert_eq!(
        fetch["entity"][0]["what"]["identifier"]["value"],
        p1.to_string()
    );

    // A record changed behind the controller's back is found, by number.
    let store = rusqlite::Connection::open(&net.store).unwrap();
    store
        .busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let id: i64 = store
        .query_row(
            "SELECT min(id) FROM snaps_audit WHERE action = 'fetch' AND site = 'STG'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    store
        .execute_batch(&format!(
            "DROP TRIGGER snaps_audit_no_update;
             UPDATE snaps_audit SET patients = '' WHERE id = {id};"
        ))
        .unwrap();
    let (ok, _, err) = cli("audit --verify").await.unwrap();
    assert!(!ok, "a broken chain fails the command");
    assert!(
        err.contains(&format!("breaks at record {id} ")) && err.contains("is not what was chained"),
        "{err}"
    );
}

/// A writer that keeps what the global controller logs.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every file of an SQLite database: the file, its WAL and shared memory.
fn database_bytes(path: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        if let Ok(b) = std::fs::read(&p) {
            out.extend(b);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_in_an_unmapped_column_never_leaves_its_site() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("snaps_global=trace")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    // No site maps patient.film_locate; STG writes a canary into it.
    const CANARY: &str = "QXJ7ZK4W";
    const SURNAME: &str = "Fieldfare";
    // STG's data carries the canary before its initial load, too.
    let film_locate = {
        let n = network();
        let site = n.site("STG").unwrap();
        let local = n.local_catalog(site).unwrap();
        local
            .relation("patient")
            .unwrap()
            .attributes
            .iter()
            .position(|a| a.name == "film_locate")
            .unwrap()
    };
    let net = setup_relayed(20, |data| {
        for row in data
            .get_mut("STG")
            .unwrap()
            .get_mut("patient")
            .unwrap()
            .iter_mut()
            .skip(1)
        {
            row[film_locate] = snaps_schema::Value::Text(CANARY.into());
        }
    })
    .await;
    let mut stg = connect(net.sites["STG"]).await;
    let own = patients(&net, "STG")[0];
    run(
        &mut stg,
        &format!(
            "INSERT INTO patient (title, surname, first_names, dob, sex, film_locate) \
             VALUES ('Ms', '{SURNAME}', 'Robin', 19600101, 'F', '{CANARY}')"
        ),
    )
    .await;
    run(
        &mut stg,
        &format!("UPDATE patient SET film_locate = '{CANARY}' WHERE pno = {own}"),
    )
    .await;
    let new_pno = one(
        &mut stg,
        &format!("SELECT pno FROM patient WHERE surname = '{SURNAME}'"),
    )
    .await
    .expect("the new patient");
    // Queries whose selections and joins name the unmapped column: they
    // stay local conjuncts, and the semi-join projections carry join
    // attributes only.
    run(
        &mut stg,
        &format!("SELECT p.surname, v.date FROM patient p, visit v WHERE p.pno = v.pno AND p.film_locate = '{CANARY}'"),
    )
    .await;
    run(
        &mut stg,
        &format!(
            "SELECT surname FROM patient WHERE film_locate = '{CANARY}' OR surname = 'Nobody'"
        ),
    )
    .await;
    // The refresh pushes the new patient and the change.
    let summary = net.refresh().await;
    assert!(summary.inserted >= 1, "{summary:?}");
    // Other sites look both patients up.
    for code in ["CPH", "GRC"] {
        let mut c = connect(net.sites[code]).await;
        for pno in [new_pno.clone(), own.to_string()] {
            assert!(
                one(
                    &mut c,
                    &format!("SELECT surname, first_names FROM patient WHERE pno = {pno}")
                )
                .await
                .is_some(),
                "{code} found {pno}"
            );
        }
    }
    net.refresh().await;

    let wire = net.relay.as_ref().unwrap().captured();
    let global_store = database_bytes(&net.store);
    let logged = logs.0.lock().unwrap().clone();
    // The capture works and mapped values do travel...
    assert!(
        contains(&wire, SURNAME.as_bytes()),
        "the relay saw no patient"
    );
    assert!(contains(&global_store, SURNAME.as_bytes()));
    assert!(contains(
        &database_bytes(&db(&net, "CPH")),
        SURNAME.as_bytes()
    ));
    assert!(!logged.is_empty(), "nothing was logged");
    // ... but the canary stays at STG.
    assert!(contains(
        &database_bytes(&db(&net, "STG")),
        CANARY.as_bytes()
    ));
    assert!(
        !contains(&wire, CANARY.as_bytes()),
        "the canary crossed the wire"
    );
    assert!(
        !contains(&global_store, CANARY.as_bytes()),
        "the canary is in the global store"
    );
    for code in ["CPH", "GRC"] {
        assert!(
            !contains(&database_bytes(&db(&net, code)), CANARY.as_bytes()),
            "the canary reached {code}"
        );
    }
    assert!(
        !contains(&logged, CANARY.as_bytes()),
        "the global controller logged the canary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_certificate_is_refused_at_once_and_a_new_one_is_let_in() {
    let certs = tempfile::tempdir().unwrap();
    snaps::localnet::issue_certificates(certs.path(), &network()).unwrap();
    let dir = certs.path().to_path_buf();
    let net = setup_with(10, move |o| o.tls = Some(dir)).await;
    let global = net.global.as_ref().unwrap();
    let fingerprint = net.network.global_catalog().unwrap().fingerprint();
    let client = |code: &'static str| async move {
        GlobalClient::connect(&global.addr, &global.site_auth(code).unwrap(), Some(code)).await
    };
    let stg = client("STG").await.unwrap();
    assert_eq!(stg.hello(&fingerprint).await.unwrap().site_code, "STG");
    let mut notices = stg.subscribe().await.unwrap();
    notices
        .message()
        .await
        .unwrap()
        .expect("the current epoch's notice");

    let revoked = snaps_proto::tls::revoke(certs.path(), &[certs.path().join("STG")]).unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].peer, Peer::Site("STG".into()));

    // The connection STG opened before: its next request is refused.
    let e = stg.hello(&fingerprint).await.unwrap_err().to_string();
    assert!(
        e.contains("the certificate of site STG") && e.contains("is revoked"),
        "{e}"
    );
    // A new connection with that certificate fails its handshake.
    let refused = match client("STG").await {
        Err(e) => e.to_string(),
        Ok(c) => c.hello(&fingerprint).await.unwrap_err().to_string(),
    };
    assert!(refused.contains("transport error"), "{refused}");
    // Other sites go on.
    let cph = client("CPH").await.unwrap();
    assert_eq!(cph.hello(&fingerprint).await.unwrap().site_code, "CPH");

    // Revoking again adds nothing; a new certificate for STG is let in.
    let list = certs.path().join(snaps_proto::tls::REVOKED_FILE);
    snaps_proto::tls::revoke(certs.path(), &[certs.path().join("STG")]).unwrap();
    assert_eq!(snaps_proto::tls::revoked_serials(&list).unwrap().len(), 1);
    snaps_proto::tls::issue_site(certs.path(), "STG").unwrap();
    let renewed = client("STG").await.unwrap();
    assert_eq!(renewed.hello(&fingerprint).await.unwrap().site_code, "STG");
    // STG's subscription, opened before, ends at the next notice.
    let admin = global.admin_client().await.unwrap();
    let refresh = tokio::spawn(async move { admin.run_refresh().await.map(|_| ()) });
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), notices.message())
        .await
        .expect("a notice within 20 s");
    let e = ended.unwrap_err().to_string();
    assert!(e.contains("is revoked"), "{e}");
    refresh.abort();
    // A revoked administrator cannot administer.
    snaps_proto::tls::revoke(certs.path(), &[certs.path().join("admin")]).unwrap();
    let admin = global.admin_client().await;
    let e = match admin {
        Err(e) => e.to_string(),
        Ok(a) => a.conflicts().await.unwrap_err().to_string(),
    };
    assert!(e.contains("transport error"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_right_given_back_brings_at_night_what_changed_while_it_was_taken() {
    let net = setup(20).await;
    let admin = net.global.as_ref().unwrap().admin_client().await.unwrap();
    let g = patients(&net, "GRC")[0];
    let mut stg = connect(net.sites["STG"]).await;
    let mut grc = connect(net.sites["GRC"]).await;
    run(
        &mut stg,
        &format!("SELECT v.vno FROM patient p, visit v WHERE p.pno = {g} AND v.pno = p.pno"),
    )
    .await;
    net.refresh().await;

    // STG may not read visits; GRC records one of its patient's.
    admin
        .grant(rule("visit", "STG", "", v1::Right::None))
        .await
        .unwrap();
    run(
        &mut grc,
        &format!(
            "INSERT INTO visit (vno, pno, date, description) VALUES (30999002, {g}, 19880505, 'While refused')"
        ),
    )
    .await;
    net.refresh().await;
    let held = || -> i64 {
        rusqlite::Connection::open(db(&net, "STG"))
            .unwrap()
            .query_row("SELECT count(*) FROM visit WHERE vno = 30999002", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert_eq!(held(), 0, "refused: the night brought nothing of it");
    let audit = admin
        .audit(v1::AuditRequest {
            site: "STG".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        audit.iter().any(|r| r.action == "refetch-denied"),
        "the refusal is on the record"
    );

    // The right given back, the next night (nothing changed in it) brings
    // the visit: the controller evaluates the standing groups whole.
    admin
        .revoke(rule("visit", "STG", "", v1::Right::None))
        .await
        .unwrap();
    net.refresh().await;
    assert_eq!(held(), 1, "the visit came with the night");
}
