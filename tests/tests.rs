//! End-to-end tests: each starts the real `ferry` binary on an ephemeral
//! loopback port with a fresh data dir, and talks to it over HTTP and
//! through the CLI, as a user would. One test binary keeps link times down.

mod e2e;
