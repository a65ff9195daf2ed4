// The save file's layout checks and the copy thread, without QEMU or root: a file cut short, grown,
// altered in its header or from another program is told apart from a whole one, and the copy sums
// what passes, stops when asked and closes the pipe end it holds.
#include "broker/flows/save_file.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json.hpp>
#include <catch2/catch.hpp>
#include <memory>
#include <string>

#include "broker/core/errc.hpp"
#include "fdpass/devices.hpp"
#include "support/qemu.hpp"
#include "support/support.hpp"

namespace sf = broker::flows::save_file;
namespace json = boost::json;

namespace {

fdpass::UniqueFd file_with(const std::string& bytes) {
  fdpass::UniqueFd fd(::memfd_create("qb-save", MFD_CLOEXEC));
  REQUIRE(fd);
  REQUIRE(::write(fd.get(), bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  return fd;
}

const json::value kDomain = json::object{{"spec", json::object{{"name", "vm1"}}}};

std::string whole(const std::string& stream) {
  const std::string head = sf::begin(kDomain);
  std::uint32_t crc =
      sf::checksum(0, head.data() + sf::kPreambleSize, head.size() - sf::kPreambleSize);
  crc = sf::checksum(crc, stream.data(), stream.size());
  return head + stream + sf::trailer(stream.size(), crc);
}

std::string refusal(const std::string& bytes) {
  auto fd = file_with(bytes);
  auto layout = sf::read_layout(fd, "path");
  REQUIRE_FALSE(layout.has_value());
  CHECK(layout.error().code == broker::errc::invalid_argument);
  CHECK(layout.error().field == "path");
  return layout.error().message;
}

// Runs `io` until the copy has ended (it cancels the wake timer then).
void wait_done(boost::asio::io_context& io, const sf::StreamCopy& copy) {
  while (!copy.done()) {
    io.restart();
    io.run_one();
  }
}

}  // namespace

TEST_CASE("a whole save file's layout is read back", "[flows][save]") {
  const std::string stream(300000, 'q');
  auto fd = file_with(whole(stream));
  auto layout = sf::read_layout(fd, "path");
  REQUIRE(layout.has_value());
  CHECK(layout->stream_length == stream.size());
  CHECK(layout->domain == kDomain);
  CHECK(sf::checksum(layout->header_crc, stream.data(), stream.size()) == layout->crc);
}

TEST_CASE("a foreign, newer, truncated, grown or corrupt save file is refused", "[flows][save]") {
  const std::string good = whole(std::string(5000, 's'));
  CHECK(refusal("#!/bin/sh\necho hello\n").find("not a qbroker save file") != std::string::npos);
  CHECK(refusal("").find("not a qbroker save file") != std::string::npos);
  std::string newer = good;
  newer[8] = 2;
  CHECK(refusal(newer).find("version 2") != std::string::npos);
  CHECK(refusal(good.substr(0, good.size() - 1)).find("truncated") != std::string::npos);
  CHECK(refusal(good.substr(0, 40)).find("truncated") != std::string::npos);
  CHECK(refusal(good + "x").find("truncated or corrupt") != std::string::npos);
  std::string header = good;
  header[sf::kPreambleSize] = '[';
  CHECK(refusal(header).find("header is corrupt") != std::string::npos);
  std::string huge = good;
  huge[15] = 0x7f;  // a header length beyond any the broker writes
  CHECK(refusal(huge).find("implausible") != std::string::npos);
}

TEST_CASE("the copy sums a pipe into a file up to EOF and closes the pipe end it holds",
          "[flows][save]") {
  // With write-behind (a save file), writeback is started every few MiB as the copy goes.
  const bool write_behind = GENERATE(false, true);
  boost::asio::io_context io;
  auto pipe = fdpass::make_pipe();
  REQUIRE(pipe);
  auto out = file_with("");
  std::string data(9u << 20, 'x');
  for (std::size_t i = 0; i < data.size(); i += 4093) data[i] = static_cast<char>(i / 4093);
  auto wake =
      std::make_shared<boost::asio::steady_timer>(io, boost::asio::steady_timer::time_point::max());
  sf::StreamCopy::Options how{.src_offset = std::nullopt,
                              .limit = std::nullopt,
                              .crc = 7,
                              .write_behind = write_behind,
                              .own_src = std::move(pipe->first),
                              .own_dst = {}};
  sf::StreamCopy copy(io.get_executor(), wake, fdpass::BorrowedFd(), out, std::move(how));
  wake->async_wait([](boost::system::error_code) {});
  REQUIRE(qbtest::write_all(pipe->second.get(), data));
  pipe->second.reset();
  wait_done(io, copy);
  CHECK(copy.error() == 0);
  CHECK_FALSE(copy.stopped());
  CHECK(copy.bytes() == data.size());
  CHECK(copy.crc() == sf::checksum(7, data.data(), data.size()));
  CHECK(::lseek(out.get(), 0, SEEK_END) == static_cast<off_t>(data.size()));
  std::string back(data.size(), '\0');
  CHECK(::pread(out.get(), back.data(), back.size(), 0) == static_cast<ssize_t>(back.size()));
  CHECK(back == data);
}

TEST_CASE("the copy feeds a file's stream into a pipe, then closes it; a stop ends it early",
          "[flows][save]") {
  boost::asio::io_context io;
  auto in = file_with("HEAD" + std::string(10, 'm') + "TAIL");
  {
    auto pipe = fdpass::make_pipe();
    REQUIRE(pipe);
    auto wake = std::make_shared<boost::asio::steady_timer>(
        io, boost::asio::steady_timer::time_point::max());
    wake->async_wait([](boost::system::error_code) {});
    sf::StreamCopy::Options how{
        .src_offset = 4, .limit = 10, .crc = 0, .own_src = {}, .own_dst = std::move(pipe->second)};
    sf::StreamCopy copy(io.get_executor(), wake, in, fdpass::BorrowedFd(), std::move(how));
    wait_done(io, copy);
    CHECK(copy.error() == 0);
    char buf[32];
    CHECK(::read(pipe->first.get(), buf, sizeof buf) == 10);
    CHECK(::read(pipe->first.get(), buf, sizeof buf) == 0);  // the copy closed the write end
  }
  {
    // Nothing comes down the pipe: only stop() ends the copy.
    auto pipe = fdpass::make_pipe();
    REQUIRE(pipe);
    auto out = file_with("");
    auto wake = std::make_shared<boost::asio::steady_timer>(
        io, boost::asio::steady_timer::time_point::max());
    wake->async_wait([](boost::system::error_code) {});
    sf::StreamCopy::Options how{.src_offset = std::nullopt,
                                .limit = std::nullopt,
                                .crc = 0,
                                .own_src = std::move(pipe->first),
                                .own_dst = {}};
    sf::StreamCopy copy(io.get_executor(), wake, fdpass::BorrowedFd(), out, std::move(how));
    copy.stop();
    wait_done(io, copy);
    CHECK(copy.stopped());
    CHECK(copy.bytes() == 0);
    // The read end went with the copy: a writer now gets EPIPE, not a block.
    auto* was = ::signal(SIGPIPE, SIG_IGN);
    CHECK(::write(pipe->second.get(), "x", 1) == -1);
    CHECK(errno == EPIPE);
    ::signal(SIGPIPE, was);
  }
  // A stream shorter than the trailer promised: ENODATA, never a short success.
  {
    auto pipe = fdpass::make_pipe();
    REQUIRE(pipe);
    auto wake = std::make_shared<boost::asio::steady_timer>(
        io, boost::asio::steady_timer::time_point::max());
    wake->async_wait([](boost::system::error_code) {});
    sf::StreamCopy::Options how{.src_offset = 10,
                                .limit = 100,
                                .crc = 0,
                                .own_src = {},
                                .own_dst = std::move(pipe->second)};
    sf::StreamCopy copy(io.get_executor(), wake, in, fdpass::BorrowedFd(), std::move(how));
    wait_done(io, copy);
    CHECK(copy.error() == ENODATA);
  }
}
