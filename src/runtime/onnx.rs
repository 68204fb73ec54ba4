//! ONNX Runtime sessions: load the library once per process, build one session
//! per replica (graph optimisation on, threads set deliberately), read the
//! model's signature, and run it on typed tensors.
//!
//! Only self-contained models get a session ([`super::inspect`]): nothing
//! is ever read from a path the model names. A run can be given a deadline
//! ([`OnnxSession::run_within`]), after which ONNX Runtime is told to stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use super::{RuntimeError, inspect, library};
use crate::protocol::tensor::each_variant;
use crate::protocol::{DataType, Tensor, TensorData};
use crate::protocol::{Signature, TensorSpec};

/// The loaded ONNX Runtime library and its process-wide environment.
pub struct OnnxRuntime {
    env: Environment,
    /// Which library file was loaded, reported at start-up.
    pub library: PathBuf,
}

impl OnnxRuntime {
    /// The one ONNX Runtime of a test process (it may be initialised once
    /// per process: every in-process test shares it).
    #[cfg(test)]
    pub fn for_tests() -> std::sync::Arc<OnnxRuntime> {
        static ONNX: std::sync::OnceLock<std::sync::Arc<OnnxRuntime>> = std::sync::OnceLock::new();
        ONNX.get_or_init(|| {
            std::sync::Arc::new(OnnxRuntime::load(None).expect("the build provisions ONNX Runtime"))
        })
        .clone()
    }

    /// Finds the library (see [`library::locate`]) and initialises ONNX Runtime.
    /// Call once per process.
    pub fn load(explicit: Option<&Path>) -> Result<OnnxRuntime, RuntimeError> {
        let path = library::locate(explicit)?;
        let load_err = |reason: String| RuntimeError::LibraryLoad {
            path: path.display().to_string(),
            reason,
        };
        let env = ort::init_from(&path)
            .map_err(|e| load_err(e.to_string()))?
            .with_name("ferry")
            .build()
            .map_err(|e| load_err(e.to_string()))?;
        Ok(OnnxRuntime { env, library: path })
    }

    /// Builds a session for one replica. `threads` is the intra-op thread
    /// count: replicas × threads should not exceed the cores. A model that
    /// is not self-contained (external data) is refused before ONNX Runtime
    /// sees it, here and so at registration and at every load.
    pub fn session(&self, model: &[u8], threads: usize) -> Result<OnnxSession, RuntimeError> {
        self.session_of(ModelBytes::Memory(model), threads)
    }

    /// Builds a session from a model file (ONNX Runtime reads it itself: a
    /// large upload is never copied into Ferry's memory to validate it).
    pub fn session_from_file(
        &self,
        path: &std::path::Path,
        threads: usize,
    ) -> Result<OnnxSession, RuntimeError> {
        self.session_of(ModelBytes::File(path), threads)
    }

    fn session_of(&self, model: ModelBytes, threads: usize) -> Result<OnnxSession, RuntimeError> {
        // Checked before ONNX Runtime sees the model; a file as it is read,
        // its tensors' data skipped, never loaded.
        let checked = match model {
            ModelBytes::Memory(bytes) => inspect::check_self_contained(bytes),
            ModelBytes::File(path) => inspect::check_file(path)
                .map_err(|e| RuntimeError::InvalidModel(format!("cannot read the model: {e}")))?,
        };
        checked.map_err(|why| RuntimeError::Refused(why.to_string()))?;
        let invalid = |e: String| RuntimeError::InvalidModel(e);
        let mut builder = Session::builder(&self.env)
            .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::Level3)?))
            // Belt and braces: were external data ever let through, it would
            // be looked for in a directory that does not exist, never in the
            // working directory.
            .and_then(|b| {
                Ok(b.with_config_entry(
                    "session.model_external_initializers_file_folder_path",
                    NO_EXTERNAL_DATA_DIR,
                )?)
            })
            .and_then(|b| Ok(b.with_intra_threads(threads.max(1))?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|b| Ok(b.with_intra_op_spinning(false)?))
            .map_err(|e| invalid(e.to_string()))?;
        let session = match model {
            ModelBytes::Memory(bytes) => builder.commit_from_memory(bytes),
            ModelBytes::File(path) => builder.commit_from_file(path),
        }
        .map_err(|e| invalid(e.to_string()))?;
        let signature = Signature {
            inputs: session
                .inputs()
                .iter()
                .map(|o| spec(o.name(), o.dtype(), "input"))
                .collect::<Result<_, _>>()?,
            outputs: session
                .outputs()
                .iter()
                .map(|o| spec(o.name(), o.dtype(), "output"))
                .collect::<Result<_, _>>()?,
        };
        Ok(OnnxSession { session, signature })
    }
}

/// Where ONNX Runtime is told external data lives: nowhere.
const NO_EXTERNAL_DATA_DIR: &str = "/nonexistent/ferry-models-are-self-contained";

fn datatype(t: TensorElementType) -> Option<DataType> {
    Some(match t {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        _ => return None,
    })
}

fn spec(name: &str, ty: &ValueType, role: &str) -> Result<TensorSpec, RuntimeError> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            let dt = datatype(*ty).ok_or_else(|| {
                RuntimeError::UnsupportedSignature(format!(
                    "{role} \"{name}\" has element type {ty:?}; Ferry serves BOOL, integer and floating-point tensors"
                ))
            })?;
            Ok(TensorSpec {
                name: name.to_string(),
                datatype: dt,
                shape: shape.iter().map(|d| if *d < 0 { -1 } else { *d }).collect(),
            })
        }
        ValueType::Sequence(inner) if matches!(**inner, ValueType::Map { .. }) => {
            Err(RuntimeError::UnsupportedSignature(format!(
                "{role} \"{name}\" is a sequence of maps (scikit-learn's ZipMap), not a tensor; export the model \
                 with skl2onnx's options={{id(model): {{\"zipmap\": False}}}} to get a probabilities tensor"
            )))
        }
        other => Err(RuntimeError::UnsupportedSignature(format!(
            "{role} \"{name}\" is {other:?}, not a tensor; Ferry serves models whose inputs and outputs are tensors"
        ))),
    }
}

/// One ONNX Runtime session with its signature. Owned by one worker thread.
pub struct OnnxSession {
    session: Session,
    signature: Signature,
}

fn to_ort(t: Tensor) -> Result<DynValue, ort::Error> {
    let shape = t.shape;
    Ok(each_variant!(t.data, v => OrtTensor::from_array((shape, v))?.into_dyn()))
}

fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, RuntimeError> {
    macro_rules! extract {
        ($variant:ident, $t:ty) => {{
            let (shape, data) = value
                .try_extract_tensor::<$t>()
                .map_err(|e| RuntimeError::Inference(e.to_string()))?;
            (shape.to_vec(), TensorData::$variant(data.to_vec()))
        }};
    }
    let dt = value
        .dtype()
        .tensor_type()
        .and_then(datatype)
        .ok_or_else(|| {
            RuntimeError::Inference(format!(
                "output \"{name}\" is not a tensor Ferry can return"
            ))
        })?;
    let (shape, data) = match dt {
        DataType::Bool => extract!(Bool, bool),
        DataType::Uint8 => extract!(Uint8, u8),
        DataType::Uint16 => extract!(Uint16, u16),
        DataType::Uint32 => extract!(Uint32, u32),
        DataType::Uint64 => extract!(Uint64, u64),
        DataType::Int8 => extract!(Int8, i8),
        DataType::Int16 => extract!(Int16, i16),
        DataType::Int32 => extract!(Int32, i32),
        DataType::Int64 => extract!(Int64, i64),
        DataType::Fp16 => extract!(Fp16, half::f16),
        DataType::Fp32 => extract!(Fp32, f32),
        DataType::Fp64 => extract!(Fp64, f64),
    };
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}

impl OnnxSession {
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs the model; inputs must already match the signature.
    pub fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_with(inputs, None)
    }

    /// Runs the model, telling ONNX Runtime to stop if the run has not
    /// finished within `limit` (a watchdog thread; for warm-ups, not the
    /// request path). A run stopped that way is [`RuntimeError::Deadline`].
    pub fn run_within(
        &mut self,
        inputs: Vec<Tensor>,
        limit: Duration,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let options =
            Arc::new(RunOptions::new().map_err(|e| RuntimeError::Inference(e.to_string()))?);
        let (finished, done) = channel::<()>();
        let watchdog = {
            let options = options.clone();
            std::thread::Builder::new()
                .name("ferry-deadline".into())
                .spawn(move || match done.recv_timeout(limit) {
                    Err(RecvTimeoutError::Timeout) => options.terminate().is_ok(),
                    _ => false,
                })
                .map_err(|e| {
                    RuntimeError::Unavailable(format!("cannot start a watchdog thread: {e}"))
                })?
        };
        let result = self.run_with(inputs, Some(&options));
        drop(finished);
        let terminated = watchdog.join().unwrap_or(false);
        match result {
            Err(_) if terminated => Err(RuntimeError::Deadline(limit)),
            other => other,
        }
    }

    /// Runs the model under `options`, whose terminate flag another thread
    /// may set to stop the run.
    pub fn run_with(
        &mut self,
        inputs: Vec<Tensor>,
        options: Option<&RunOptions>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(inputs.len());
        for t in inputs {
            let name = t.name.clone();
            let v =
                to_ort(t).map_err(|e| RuntimeError::BadInput(format!("input \"{name}\": {e}")))?;
            values.push((name, v));
        }
        let outputs = match options {
            Some(options) => self.session.run_with_options(values, options),
            None => self.session.run(values),
        }
        .map_err(|e| RuntimeError::Inference(e.to_string()))?;
        self.signature
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(&spec.name).ok_or_else(|| {
                    RuntimeError::Inference(format!(
                        "output \"{}\" missing from the result",
                        spec.name
                    ))
                })?;
                from_ort(&spec.name, value)
            })
            .collect()
    }
}

/// Where a model's bytes are.
enum ModelBytes<'a> {
    Memory(&'a [u8]),
    File(&'a std::path::Path),
}
