// AudioWorklet processor: microphone samples (the AudioContext's rate) -> 16 kHz mono PCM16 chunks.
// Downsampling is a windowed-sinc low-pass interpolator (cutoff 0.9 x the target Nyquist), so any
// context rate works (48 kHz, 44.1 kHz, ...). Every `chunkMs` the node posts {pcm: ArrayBuffer
// (Int16, little-endian), level: RMS in [0, 1]} to its port.
class PCM16Downsampler extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.target = opts.targetRate || 16000;
    this.ratio = sampleRate / this.target; // input samples per output sample
    this.chunk = Math.max(1, Math.round(this.target * (opts.chunkMs || 20) / 1000));
    this.fc = Math.min(1, 1 / this.ratio) * 0.9; // cutoff relative to the input Nyquist
    this.half = this.ratio === 1 ? 0 : Math.ceil(8 / this.fc); // filter half-width in input samples
    this.buf = new Float32Array(4096);
    this.bufStart = -this.half; // absolute input index of buf[0] (history starts as silence)
    this.bufLen = this.half;
    this.nextOut = 0; // absolute index of the next output sample
    this.out = new Int16Array(this.chunk);
    this.outLen = 0;
    this.sumSq = 0;
  }

  append(samples) {
    if (this.bufLen + samples.length > this.buf.length) {
      const grown = new Float32Array(Math.max(this.buf.length * 2, this.bufLen + samples.length));
      grown.set(this.buf.subarray(0, this.bufLen));
      this.buf = grown;
    }
    this.buf.set(samples, this.bufLen);
    this.bufLen += samples.length;
  }

  emit(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.out[this.outLen++] = v < 0 ? v * 32768 : v * 32767;
    this.sumSq += v * v;
    if (this.outLen === this.chunk) {
      const pcm = this.out.slice().buffer;
      this.port.postMessage({ pcm, level: Math.sqrt(this.sumSq / this.chunk) }, [pcm]);
      this.outLen = 0;
      this.sumSq = 0;
    }
  }

  sample(t) {
    // band-limited value of the input at absolute (fractional) position t
    const lo = Math.ceil(t - this.half), hi = Math.floor(t + this.half);
    let acc = 0, norm = 0;
    for (let n = lo; n <= hi; n++) {
      const x = n - t;
      const arg = Math.PI * this.fc * x;
      const sinc = x === 0 ? 1 : Math.sin(arg) / arg;
      const w = 0.5 + 0.5 * Math.cos(Math.PI * x / (this.half + 1)); // Hann window
      const k = sinc * w;
      acc += k * this.buf[n - this.bufStart];
      norm += k;
    }
    return norm ? acc / norm : 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const mono = input[0];
    if (this.ratio === 1) {
      for (let i = 0; i < mono.length; i++) this.emit(mono[i]);
      return true;
    }
    this.append(mono);
    const lastIndex = this.bufStart + this.bufLen - 1;
    while (this.nextOut * this.ratio + this.half <= lastIndex) {
      this.emit(this.sample(this.nextOut * this.ratio));
      this.nextOut++;
    }
    const keepFrom = Math.floor(this.nextOut * this.ratio - this.half) - 1;
    const drop = keepFrom - this.bufStart;
    if (drop > 0) {
      this.buf.copyWithin(0, drop, this.bufLen);
      this.bufLen -= drop;
      this.bufStart += drop;
    }
    return true;
  }
}

registerProcessor("pcm16-downsampler", PCM16Downsampler);
