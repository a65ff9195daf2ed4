// qmp benchmark: query-status round trips through qmp::Client against a minimal hand-written
// raw socket loop, on the same QEMU in the same run, plus resident memory per idle connection,
// plus parsing throughput of the client's read path against Boost.JSON's stream_parser.
//
// One QEMU (-machine none) gets two monitors on socketpairs, one for the raw loop and one for the
// client; raw and client rounds alternate on it so drift hits both alike. A second QEMU gets N
// monitors for N idle clients (QEMU polls every monitor on each main-loop pass, so they would
// slow the first one down).
//
// Parsing: a recorded QMP stream (QEMU 7.2 replies and events as the broker sees them, and the
// query-qmp-schema reply recorded from the running QEMU) is fed in 8 KiB reads to LineDecoder +
// MessageParser, exactly as the client's reader does, and to a stream_parser (one value at a
// time, default options and storage), alternating, in the same run; MB/s are per CPU second.
// Usage: qmp_bench [--seconds S] [--rounds R] [--idle N] [--parse-only] [--check]
//   --parse-only: skip the round trips and the idle connections.
//   --check: exit 1 when a target is missed (client rate >= 90% of raw, <= 64 KiB per idle
//            connection, parsing >= 90% of stream_parser on the mixed stream).
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/json/stream_parser.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "qemu_process.hpp"
#include "qmp/client.hpp"
#include "qmp/wire.hpp"

namespace asio = boost::asio;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

double cpu_seconds() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}

struct Samples {
  std::vector<double> us;  // per round trip
  double seconds = 0;
  double cpu = 0;  // this process's user + system time

  double cpu_us_per_call() const {
    return us.empty() ? 0 : cpu * 1e6 / static_cast<double>(us.size());
  }

  double rate() const { return seconds > 0 ? static_cast<double>(us.size()) / seconds : 0; }
  double pct(double p) {
    if (us.empty()) return 0;
    std::sort(us.begin(), us.end());
    return us[static_cast<std::size_t>(p * static_cast<double>(us.size() - 1))];
  }
};

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "qmp_bench: %s\n", what.c_str());
  std::exit(2);
}

// The floor: blocking write of a fixed command, blocking read up to the newline. No JSON.
class RawLoop {
 public:
  explicit RawLoop(fdpass::UniqueFd fd) : fd_(std::move(fd)) {
    read_line();  // greeting
    write_all("{\"execute\":\"qmp_capabilities\"}\n");
    read_line();
  }

  // Sends `cmd` and returns the reply line as received, with its line end.
  std::string call(std::string_view cmd) {
    write_all(cmd);
    std::string line;
    read_line(&line);
    return line;
  }

  void round(Clock::time_point until, Samples& s) {
    static constexpr std::string_view kCmd = "{\"execute\":\"query-status\"}\n";
    const double cpu0 = cpu_seconds();
    auto start = Clock::now();
    auto t = start;
    while (t < until) {
      write_all(kCmd);
      read_line();
      auto now = Clock::now();
      s.us.push_back(std::chrono::duration<double, std::micro>(now - t).count());
      t = now;
    }
    s.seconds += std::chrono::duration<double>(t - start).count();
    s.cpu += cpu_seconds() - cpu0;
  }

 private:
  void write_all(std::string_view b) {
    while (!b.empty()) {
      ssize_t n = ::write(fd_.get(), b.data(), b.size());
      if (n <= 0) die("raw write failed");
      b.remove_prefix(static_cast<std::size_t>(n));
    }
  }
  // Consumes one line; copies it to `out` when given (the round trips do not).
  void read_line(std::string* out = nullptr) {
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        if (out != nullptr) out->assign(buf_, 0, nl + 1);
        buf_.erase(0, nl + 1);
        return;
      }
      char tmp[65536];
      ssize_t n = ::read(fd_.get(), tmp, sizeof(tmp));
      if (n <= 0) die("raw read failed");
      buf_.append(tmp, static_cast<std::size_t>(n));
    }
  }

  fdpass::UniqueFd fd_;
  std::string buf_;
};

asio::awaitable<void> client_round(qmp::Client& c, Clock::time_point until, Samples& s) {
  const double cpu0 = cpu_seconds();
  auto start = Clock::now();
  auto t = start;
  while (t < until) {
    auto r = co_await c.execute(qmp::cmd::query_status(), qmp::after(5s));
    if (!r) die("client: " + r.error().message);
    auto now = Clock::now();
    s.us.push_back(std::chrono::duration<double, std::micro>(now - t).count());
    t = now;
  }
  s.seconds += std::chrono::duration<double>(t - start).count();
  s.cpu += cpu_seconds() - cpu0;
}

template <class T>
T run(asio::io_context& io, asio::awaitable<T> a) {
  std::optional<T> out;
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e, T v) {
    if (e) std::rethrow_exception(e);
    out.emplace(std::move(v));
  });
  io.restart();
  while (!out) io.run_one();
  return std::move(*out);
}

void run(asio::io_context& io, asio::awaitable<void> a) {
  bool done = false;
  asio::co_spawn(io, std::move(a), [&](std::exception_ptr e) {
    if (e) std::rethrow_exception(e);
    done = true;
  });
  io.restart();
  while (!done) io.run_one();
}

// --- Parsing --------------------------------------------------------------------------------

namespace json = boost::json;

// Replies and events in QEMU 7.2's own formatting, as a broker's monitor sees them: query-block
// as 7.2 prints a qcow2 on an fdset with a raw backing file and an empty CD drive, query-fdsets
// with two sets, a device unplug's two DEVICE_DELETED events, STOP/RESUME, add-fd, an empty
// return and an error.
// Long messages span several adjacent literals.
// NOLINTBEGIN(bugprone-suspicious-missing-comma)
constexpr std::string_view kSmallMessages[] = {
    R"({"return": {"status": "running", "singlestep": false, "running": true}})",
    R"({"return": [{"device": "", "locked": false, "removable": false, "inserted": {"iops_rd": 0, )"
    R"("detect_zeroes": "off", "image": {"backing-image": {"virtual-size": 1073741824, )"
    R"("filename": "/dev/fdset/2", "format": "raw", "actual-size": 4096, "dirty-flag": false}, )"
    R"("backing-filename-format": "raw", "virtual-size": 1073741824, "filename": "/dev/fdset/1", )"
    R"("cluster-size": 65536, "format": "qcow2", "actual-size": 200704, "format-specific": )"
    R"({"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": )"
    R"(false, "refcount-bits": 16, "corrupt": false, "extended-l2": false}}, )"
    R"("full-backing-filename": "/dev/fdset/2", "backing-filename": "/dev/fdset/2", )"
    R"("dirty-flag": false}, "iops_wr": 0, "ro": false, "node-name": "qb-d0-fmt", )"
    R"("backing_file_depth": 1, "drv": "qcow2", "iops": 0, "bps_wr": 0, "write_threshold": 0, )"
    R"("backing_file": "/dev/fdset/2", "encrypted": false, "bps": 0, "bps_rd": 0, "cache": )"
    R"({"no-flush": false, "direct": false, "writeback": true}, "file": "/dev/fdset/1"}, )"
    R"("qdev": "/machine/peripheral/d0/virtio-backend", "type": "unknown"}, {"device": "", )"
    R"("locked": false, "removable": true, "qdev": "cd0", "tray_open": false, "type": "unknown"}]})",
    R"({"return": [{"fds": [{"fd": 11, "opaque": "qb-cd0-file"}], "fdset-id": 1}, )"
    R"({"fds": [{"fd": 3, "opaque": "qb-d0-file"}], "fdset-id": 0}]})",
    R"({"return": {"fd": 12, "fdset-id": 2}})",
    R"({"timestamp": {"seconds": 1733012345, "microseconds": 512345}, "event": "DEVICE_DELETED", )"
    R"("data": {"path": "/machine/peripheral/d1/virtio-backend"}})",
    R"({"timestamp": {"seconds": 1733012345, "microseconds": 514002}, "event": "DEVICE_DELETED", )"
    R"("data": {"device": "d1", "path": "/machine/peripheral/d1"}})",
    R"({"return": {}})",
    R"({"timestamp": {"seconds": 1733012346, "microseconds": 1203}, "event": "STOP"})",
    R"({"timestamp": {"seconds": 1733012346, "microseconds": 90211}, "event": "RESUME"})",
    R"({"error": {"class": "DeviceNotFound", "desc": "Device 'd9' not found"}})",
};
// NOLINTEND(bugprone-suspicious-missing-comma)

struct Streams {
  std::string small;   // kSmallMessages, repeated
  std::string schema;  // one query-qmp-schema reply, as QEMU sent it
  std::string mixed;   // both, about half the bytes each
};

Streams record_streams(RawLoop& raw) {
  Streams s;
  s.schema = raw.call("{\"execute\":\"query-qmp-schema\"}\n");
  while (s.small.size() < s.schema.size()) {
    for (auto m : kSmallMessages) {
      s.small += m;
      s.small += "\r\n";  // QEMU ends lines with CRLF
    }
  }
  s.mixed = s.small + s.schema;
  return s;
}

constexpr std::size_t kReadSize = 8192;  // the client's default read size

// Our read path, as the client's reader runs it: reads land in the decoder, lines are parsed by
// one parser per connection. Returns the messages parsed.
std::size_t parse_ours(std::string_view stream, qmp::LineDecoder& decoder,
                       qmp::MessageParser& parser) {
  std::size_t messages = 0;
  for (std::size_t at = 0; at < stream.size(); at += kReadSize) {
    const std::size_t n = std::min(kReadSize, stream.size() - at);
    std::memcpy(decoder.prepare(n).data(), stream.data() + at, n);
    decoder.commit(n);
    for (;;) {
      auto line = decoder.next_line();
      if (!line) die("decoder: " + line.error().message);
      if (!*line) break;
      auto msg = parser.parse(**line);
      if (!msg) die("parser: " + msg.error().message);
      messages += 1 + msg->index();  // use the result
    }
  }
  return messages;
}

// The reference: the same reads, each copied to a buffer as recv would, and parsed one JSON value
// at a time by a stream_parser with its defaults. Returns the values parsed.
std::size_t parse_stream_parser(std::string_view stream, json::stream_parser& p) {
  static char buf[kReadSize];
  std::size_t values = 0;
  for (std::size_t at = 0; at < stream.size(); at += kReadSize) {
    std::size_t n = std::min(kReadSize, stream.size() - at);
    std::memcpy(buf, stream.data() + at, n);
    const char* d = buf;
    while (n > 0) {
      boost::system::error_code ec;
      const std::size_t used = p.write_some(d, n, ec);
      if (ec) die("stream_parser: " + ec.message());
      d += used;
      n -= used;
      if (p.done()) {
        json::value v = p.release();
        values += 1 + static_cast<std::size_t>(v.kind());  // use the result
        p.reset();
      }
    }
  }
  return values;
}

struct Throughput {
  double bytes = 0;
  double seconds = 0;
  double mb_per_s() const { return seconds > 0 ? bytes / seconds / 1e6 : 0; }
};

double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

// Runs `pass` (one pass over `stream`) until `slice` has elapsed, at least once. Counts this
// thread's CPU time, so time the thread spent descheduled does not count against either side.
template <class Pass>
void timed_passes(std::string_view stream, Clock::duration slice, Throughput& t, Pass&& pass) {
  std::size_t sink = 0;
  const auto until = Clock::now() + slice;
  const double cpu0 = thread_cpu_seconds();
  do {
    sink += pass();
    t.bytes += static_cast<double>(stream.size());
  } while (Clock::now() < until);
  t.seconds += thread_cpu_seconds() - cpu0;
  if (sink == 0) die("nothing parsed");
}

struct ParseResult {
  Throughput ours;
  Throughput reference;
  std::vector<double> ratios;  // ours / reference, one per pair of adjacent slices

  // The median of the per-pair ratios: each pair ran back to back, so a slow spell of the
  // machine (the other core's load, frequency) moves both sides of a pair alike.
  double ratio() {
    if (ratios.empty()) return 0;
    std::sort(ratios.begin(), ratios.end());
    return ratios[ratios.size() / 2];
  }
};

// Ten pairs of slices per round, each pair in alternating order.
constexpr int kPairsPerRound = 10;

ParseResult bench_parse(std::string_view stream, double seconds, int rounds) {
  const qmp::Limits limits;
  // One decoder and one parser per connection, kept across passes as the client keeps them.
  qmp::LineDecoder decoder(limits.max_line, kReadSize);
  qmp::MessageParser parser(limits);
  json::parse_options opt;
  opt.max_depth = limits.max_depth;
  json::stream_parser sp({}, opt);
  const int pairs = rounds * kPairsPerRound;
  const auto slice =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds / pairs));
  auto ours = [&](Throughput& t) {
    timed_passes(stream, slice, t, [&] { return parse_ours(stream, decoder, parser); });
  };
  auto reference = [&](Throughput& t) {
    timed_passes(stream, slice, t, [&] { return parse_stream_parser(stream, sp); });
  };
  Throughput warm;
  ours(warm);
  reference(warm);
  ParseResult r;
  for (int i = 0; i < pairs; ++i) {
    Throughput a;
    Throughput b;
    if (i % 2 == 0) {
      ours(a);
      reference(b);
    } else {
      reference(b);
      ours(a);
    }
    r.ratios.push_back(b.mb_per_s() > 0 ? a.mb_per_s() / b.mb_per_s() : 0);
    r.ours.bytes += a.bytes;
    r.ours.seconds += a.seconds;
    r.reference.bytes += b.bytes;
    r.reference.seconds += b.seconds;
  }
  return r;
}

std::size_t rss_kib() {
  std::ifstream in("/proc/self/statm");
  std::size_t pages = 0;
  std::size_t resident = 0;
  in >> pages >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) / 1024;
}

struct Options {
  double seconds = 1.0;
  int rounds = 3;
  int idle = 200;
  bool parse_only = false;
  bool check = false;
};

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) {
      o.seconds = std::atof(argv[++i]);
    } else if (a == "--rounds" && i + 1 < argc) {
      o.rounds = std::atoi(argv[++i]);
    } else if (a == "--idle" && i + 1 < argc) {
      o.idle = std::atoi(argv[++i]);
    } else if (a == "--parse-only") {
      o.parse_only = true;
    } else if (a == "--check") {
      o.check = true;
    } else {
      die("usage: qmp_bench [--seconds S] [--rounds R] [--idle N] [--parse-only] [--check]");
    }
  }
  if (o.rounds < 1) die("--rounds must be at least 1");
  return o;
}

// query-status through the client against the raw loop; returns the client/raw rate ratio.
double round_trips(asio::io_context& io, RawLoop& raw, qmp::Client& client, const Options& o) {
  // Warm up both paths, then alternate.
  Samples warm;
  raw.round(Clock::now() + 100ms, warm);
  run(io, client_round(client, Clock::now() + 100ms, warm));
  Samples raw_s;
  Samples client_s;
  const auto slice = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(o.seconds / o.rounds));
  for (int r = 0; r < o.rounds; ++r) {
    raw.round(Clock::now() + slice, raw_s);
    run(io, client_round(client, Clock::now() + slice, client_s));
  }
  const double ratio = raw_s.rate() > 0 ? client_s.rate() / raw_s.rate() : 0;
  std::printf("round trips: query-status, %.1f s per side in %d rounds\n", o.seconds, o.rounds);
  std::printf(
      "  raw socket loop : %7.0f req/s   p50 %7.1f us   p99 %7.1f us   cpu %5.1f us/call"
      "   (%zu calls)\n",
      raw_s.rate(), raw_s.pct(0.5), raw_s.pct(0.99), raw_s.cpu_us_per_call(), raw_s.us.size());
  std::printf(
      "  qmp::Client     : %7.0f req/s   p50 %7.1f us   p99 %7.1f us   cpu %5.1f us/call"
      "   (%zu calls)\n",
      client_s.rate(), client_s.pct(0.5), client_s.pct(0.99), client_s.cpu_us_per_call(),
      client_s.us.size());
  std::printf("  ratio client/raw: %.1f %%   (target >= 90 %%)\n", ratio * 100);
  return ratio;
}

// Idle connections: what each one keeps resident once connected and negotiated. Returns KiB per
// connection.
double idle_connections(asio::io_context& io, int idle) {
  auto idle_qemu = qbtest::QemuProcess::start(idle);
  std::vector<std::unique_ptr<qmp::Client>> clients;
  const std::size_t before = rss_kib();
  for (int i = 0; i < idle; ++i) {
    auto c =
        run(io, qmp::Client::connect(io.get_executor(),
                                     std::move(idle_qemu->monitors[static_cast<std::size_t>(i)]),
                                     qmp::after(30s)));
    if (!c) die("idle connect: " + c.error().message);
    clients.push_back(std::move(*c));
  }
  io.restart();
  io.poll();
  const std::size_t after = rss_kib();
  const double per_conn_kib = static_cast<double>(after - std::min(after, before)) / idle;
  std::printf(
      "idle connections: %d, RSS %zu -> %zu KiB, %.1f KiB per connection (target <= 64 KiB)\n",
      idle, before, after, per_conn_kib);
  return per_conn_kib;
}

// Parsing throughput on the three recorded streams; returns the ratio on the mixed one.
double parsing(RawLoop& raw, const Options& o) {
  const Streams streams = record_streams(raw);
  std::printf(
      "parsing: LineDecoder + MessageParser vs boost::json::stream_parser, same bytes, %zu-byte "
      "reads, %.1f s per side per stream in %d pairs\n",
      kReadSize, o.seconds, o.rounds * kPairsPerRound);
  const std::pair<const char*, const std::string*> rows[] = {
      {"small replies and events", &streams.small},
      {"query-qmp-schema reply", &streams.schema},
      {"mixed (half each)", &streams.mixed},
  };
  double mixed_ratio = 0;
  for (const auto& [name, stream] : rows) {
    ParseResult r = bench_parse(*stream, o.seconds, o.rounds);
    std::printf(
        "  %-25s %6.1f KiB: ours %6.1f MB/s   stream_parser %6.1f MB/s   ratio (median) %.2f\n",
        name, static_cast<double>(stream->size()) / 1024, r.ours.mb_per_s(), r.reference.mb_per_s(),
        r.ratio());
    mixed_ratio = r.ratio();
  }
  std::printf("  ratio on the mixed stream: %.2f   (target >= 0.90)\n", mixed_ratio);
  return mixed_ratio;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_args(argc, argv);
  auto qemu = qbtest::QemuProcess::start(2);
  asio::io_context io;
  RawLoop raw(std::move(qemu->monitors[0]));
  auto connected = run(
      io, qmp::Client::connect(io.get_executor(), std::move(qemu->monitors[1]), qmp::after(30s)));
  if (!connected) die("connect: " + connected.error().message);
  auto& client = **connected;
  std::printf("qmp bench: QEMU %s (%s, -machine none)\n",
              client.greeting().version.to_string().c_str(), qbtest::qemu_accel().c_str());

  bool ok = true;
  if (!o.parse_only) {
    ok = round_trips(io, raw, client, o) >= 0.9 && ok;
    // Before the parsing runs: what they free would hide what the connections take.
    if (o.idle > 0) ok = idle_connections(io, o.idle) <= 64.0 && ok;
  }
  ok = parsing(raw, o) >= 0.9 && ok;
  return o.check && !ok ? 1 : 0;
}
