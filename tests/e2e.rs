pub mod harness;

mod data_plane;
mod registry;
mod remote;
mod restart;
mod triton;
