pub mod harness;
pub mod upstream;

mod data_plane;
mod registry;
mod remote;
mod restart;
mod routing;
mod triton;
