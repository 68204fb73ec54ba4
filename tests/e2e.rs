pub mod harness;
#[path = "../src/store/testpg.rs"]
pub mod testpg;
pub mod upstream;

mod cli;
mod config;
mod dashboard;
mod data_plane;
mod demo;
mod docs;
mod external;
mod faults;
mod grpc;
mod hostile_clients;
mod hostile_models;
mod hostile_specs;
mod layers;
mod load;
mod postgres;
mod registry;
mod remote;
mod restart;
mod rollouts;
mod routing;
mod schemathesis;
mod strategies;
mod tls;
mod triton;
