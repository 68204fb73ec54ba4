pub mod harness;
pub mod upstream;

mod dashboard;
mod data_plane;
mod docs;
mod external;
mod faults;
mod hostile;
mod load;
mod registry;
mod remote;
mod restart;
mod rollouts;
mod routing;
mod schemathesis;
mod strategies;
mod tls;
mod triton;
