// A scripted fake QMP peer, for what a real QEMU will not do on demand: hostile lines, bogus ids,
// fds sent back, slow drips, a close in mid-line, a greeting that never comes.
//
// The peer owns one end of a socketpair and runs its script on its own thread with non-blocking
// I/O; every wait is bounded by the script's timeout and by stop(), so a test can never hang on
// it. Commands are read one byte at a time, so an fd is attributed to the exact byte it came
// with: Received::fd_on_first_byte proves the client sent it with the command's first byte.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <boost/json/object.hpp>
#include <boost/json/value.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "fdpass/unique_fd.hpp"

namespace qbfake {

// A command the peer read.
struct Received {
  std::string line;
  std::string name;
  std::optional<boost::json::value> id;  // absent when the client sent none
  boost::json::object args;
  std::vector<fdpass::UniqueFd> fds;
  bool fd_on_first_byte = false;
};

class FakeQmpPeer;

// What the peer does, in order. Each builder appends one step.
class Script {
 public:
  using Step = std::function<bool(FakeQmpPeer&)>;  // false: stop the script

  // The greeting QEMU 7.2 sends (with the "oob" capability), and the answer to
  // qmp_capabilities.
  Script& greeting();
  Script& handshake();  // greeting() + expect("qmp_capabilities") + reply({})
  // Reads one command; records an error when its name is not `name` (empty: any name).
  Script& expect(std::string name = {});
  // Answers the n-th command read (default: the latest) with its own id.
  Script& reply(boost::json::value ret = boost::json::object{}, std::optional<std::size_t> n = {});
  Script& reply_error(std::string cls, std::string desc, std::optional<std::size_t> n = {});
  // Answers with an arbitrary id (or none: nullopt).
  Script& reply_with_id(std::optional<boost::json::value> id,
                        boost::json::value ret = boost::json::object{});
  Script& error_with_id(std::optional<boost::json::value> id, std::string cls, std::string desc);
  Script& event(std::string name, boost::json::object data = {});
  // Sends bytes as they are (a '\n' is not added).
  Script& raw(std::string bytes);
  // Sends `bytes` with `fd` attached to the first byte.
  Script& raw_with_fd(std::string bytes, fdpass::BorrowedFd fd);
  // One byte every `interval`.
  Script& drip(std::string bytes,
               std::chrono::milliseconds interval = std::chrono::milliseconds(1));
  // Streams a line of `size` bytes (a JSON string that never ends until then), generated on the
  // fly; stops quietly when the client stops reading.
  Script& huge_line(std::size_t size);
  // `depth` nested arrays on one line.
  Script& deep_nesting(std::size_t depth);
  // Does nothing until the client closes (or the timeout).
  Script& wait_for_close();
  // Closes the socket (a close in mid-line when raw() sent a partial line before).
  Script& close();
  // Runs `f` on the peer thread (for checks between steps).
  Script& then(Step f);

  std::vector<Step> steps;
};

class FakeQmpPeer {
 public:
  // Starts running `script` at once. `timeout` bounds every wait of the peer.
  explicit FakeQmpPeer(Script script,
                       std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));
  ~FakeQmpPeer();
  FakeQmpPeer(const FakeQmpPeer&) = delete;
  FakeQmpPeer& operator=(const FakeQmpPeer&) = delete;

  // The client's end of the socketpair (once).
  fdpass::UniqueFd client_end();

  struct Report {
    std::vector<Received> commands;
    std::vector<std::string> errors;  // script expectations that failed
    bool client_closed = false;       // the peer saw the client close its end
    std::uint64_t bytes_sent = 0;
  };
  // Waits for the script to end and returns what happened. Stops the peer first if `stop`.
  Report join(bool stop = false);
  void stop();

  // --- for steps (run on the peer thread) ---
  bool send_bytes(std::string_view bytes, fdpass::BorrowedFd fd = {});
  std::optional<Received> read_command();
  bool wait_closed();
  bool pause(std::chrono::milliseconds d);  // false when stopped
  void fail(std::string what);
  void close_socket();
  std::vector<Received>& commands() { return report_.commands; }

 private:
  enum class Wait { ready, timeout, stopped, closed };
  Wait wait(short events, std::chrono::steady_clock::time_point deadline);
  void run(Script script);

  fdpass::UniqueFd sock_;
  fdpass::UniqueFd client_;
  fdpass::UniqueFd stop_rd_;
  fdpass::UniqueFd stop_wr_;
  std::chrono::milliseconds timeout_;
  std::atomic<bool> stopped_{false};
  Report report_;
  std::thread thread_;
  bool joined_ = false;
};

}  // namespace qbfake
