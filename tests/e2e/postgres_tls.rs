//! `ferry serve --store 'postgres://…?sslmode=verify-full&sslrootcert=CA'`
//! against a test PostgreSQL with TLS on: the instance serves over an
//! encrypted, checked connection; a CA that did not sign the server's
//! certificate, and a server without TLS when the URL requires it, stop it
//! at start with what to check.

use super::harness::{Server, batch, test_data};
use super::postgres::refused;
use super::testpg;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_reaches_postgres_over_checked_tls_and_refuses_what_it_cannot_trust() {
    let pg =
        testpg::PgServer::start_tls(&test_data("tls/server.pem"), &test_data("tls/server.key"));
    let url = pg.database();
    let ca = test_data("tls/ca.pem");
    let checked = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(&tmp.path().join("data"), &["--store", &checked]).await;
    s.add("cancer", "1", "cancer-v1.onnx");
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(2)).await;
    assert_eq!(status, 200, "{body}");
    let database = url.rsplit('/').next().unwrap();
    assert_eq!(
        pg.psql(
            database,
            "SELECT count(*) > 0 AND bool_and(s.ssl) FROM pg_stat_ssl s
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'ferry'"
        ),
        "t",
        "every connection of the instance is encrypted"
    );

    let untrusted = format!(
        "{url}?sslmode=verify-full&sslrootcert={}",
        test_data("tls/client.pem").display()
    );
    let said = refused(&untrusted);
    assert!(
        said.contains("refused the TLS connection")
            && said.contains("UnknownIssuer")
            && said.contains("sslrootcert"),
        "{said}"
    );
    let said = refused(&format!("{}?sslmode=require", testpg::database()));
    assert!(
        said.contains("server does not support TLS") && said.contains("ssl = on"),
        "{said}"
    );
}
