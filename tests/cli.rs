//! The `snaps` binary as an administrator uses it.

use std::process::{Command, Output};

fn snaps(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snaps"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run snaps")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn explain_shows_decomposition_semijoins_and_the_mapped_query() {
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/figures",
        "--site",
        "A",
        r#"retrieve (visit.all) where patient.name = "Smith" and patient.pno = visit.pno"#,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("site A, QUEL\ndecomposition (ambiguous):"),
        "{out}"
    );
    assert!(
        out.contains("  selection patient: patient.name = 'Smith'\n"),
        "{out}"
    );
    assert!(out.contains("  join: patient.pno = visit.pno\n"), "{out}");
    assert!(
        out.contains("FROM patient WHERE patient.name = 'Smith' AND <new or modified here>"),
        "{out}"
    );
    assert!(
        out.contains("(pat_addr FULL JOIN pat_other ON pat_addr.pno = pat_other.pno)"),
        "{out}"
    );
}

#[test]
fn explain_json_is_machine_readable() {
    let o = snaps(&[
        "explain",
        "--json",
        "--network",
        "fixtures/radiology",
        "--site",
        "STG",
        "SELECT * FROM patient WHERE surname = 'Jones' AND race = 'MAOR'",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v["site"], "STG");
    assert_eq!(v["language"], "sql");
    let dropped = v["plan"]["dropped"].as_array().expect("dropped list");
    assert!(
        dropped.iter().any(|d| d
            .as_str()
            .is_some_and(|s| s.contains("patient.race is not mapped"))),
        "STG does not map race: {dropped:?}"
    );
    let sql = v["mapped_sql"].as_str().expect("mapped sql");
    assert!(sql.contains("WHERE patient.surname = 'Jones'"), "{sql}");
    assert!(!sql.contains("race"), "race must not leave STG: {sql}");
}

#[test]
fn check_accepts_the_fixture_networks() {
    for network in ["fixtures/radiology", "fixtures/figures"] {
        let o = snaps(&["check", "--network", network]);
        assert!(
            o.status.success(),
            "{network}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
    let o = snaps(&["check", "--network", "fixtures/radiology"]);
    assert!(stdout(&o).contains("CPH: ok ("), "{}", stdout(&o));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/radiology",
        "--site",
        "XYZ",
        "SELECT 1",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown site XYZ in network christchurch (sites: CPH, STG, GRC)"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/radiology",
        "--site",
        "CPH",
        "SELECT surnme FROM patient",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown attribute surnme"),
        "{}",
        stderr(&o)
    );
    let o = snaps(&[
        "explain",
        "--network",
        "fixtures/radiology",
        "--site",
        "CPH",
        "retreive (p.all)",
    ]);
    assert!(!o.status.success());
    let o = snaps(&[
        "explain",
        "--network",
        "/nonexistent",
        "--site",
        "CPH",
        "SELECT 1",
    ]);
    assert!(
        stderr(&o).contains("load network /nonexistent"),
        "{}",
        stderr(&o)
    );
}
