#!/usr/bin/perl
# A third-party bridge with its own commands (ping, shout) and no snakepit code: what an author
# writes to pass the conformance suite's protocol level (docs/PROTOCOL.md). Core Perl 5 only.
use strict;
use warnings;
use JSON::PP;

# Stdout protection: the protocol keeps private copies of fd 0 and fd 1; fd 1 then points at
# stderr and fd 0 at /dev/null, so print, system() and children cannot corrupt the stream.
open(my $requests, '<&', \*STDIN) or die "dup stdin: $!";
open(my $responses, '>&', \*STDOUT) or die "dup stdout: $!";
open(STDIN, '<', '/dev/null') or die "stdin: $!";
open(STDOUT, '>&', \*STDERR) or die "stdout: $!";
binmode($requests);
binmode($responses);

my $json = JSON::PP->new->utf8->canonical;
my $max_frame = $ENV{SNAKEPIT_MAX_FRAME_BYTES} || 64 * 1024 * 1024;
my $worker_id = $ENV{SNAKEPIT_WORKER_ID} || 'shout';
my $started = time;
my $handled = 0;
$SIG{TERM} = sub { exit 0 };

sub fatal {
    my ($why) = @_;
    print STDERR "shout bridge: $why\n";
    exit 3;    # the stream cannot be trusted any more
}

# Up to $n bytes: fewer only at end of input.
sub read_bytes {
    my ($n) = @_;
    my $buf = '';
    while (length($buf) < $n) {
        my $got = sysread($requests, $buf, $n - length($buf), length($buf));
        fatal("read: $!") if !defined $got;
        last if $got == 0;
    }
    return $buf;
}

sub write_frame {
    my ($message) = @_;
    my $body = $json->encode($message);
    if (length($body) > $max_frame) {
        $body = $json->encode({ id => $message->{id}, success => JSON::PP::false,
            error => 'response of ' . length($body) . " bytes exceeds the frame limit of $max_frame bytes" });
    }
    my $frame = pack('N', length($body)) . $body;
    while (length $frame) {
        my $wrote = syswrite($responses, $frame);
        fatal("write: $!") if !defined $wrote;
        substr($frame, 0, $wrote, '');
    }
}

my %commands = (
    ping => sub {
        return { status => 'ok', runtime => 'perl', worker_id => $worker_id, pid => $$,
                 uptime => time - $started, requests_handled => $handled, capabilities => [] };
    },
    shout => sub {
        my ($args) = @_;
        die "text is required (a string)\n" if !defined $args->{text} || ref $args->{text};
        return uc $args->{text};
    },
);

while (1) {
    my $header = read_bytes(4);
    exit 0 if $header eq '';    # EOF between frames: the pool is done with us
    fatal('input ended inside a frame header') if length($header) < 4;
    my $length = unpack('N', $header);
    fatal("frame of $length bytes exceeds the limit of $max_frame") if $length > $max_frame;
    my $body = read_bytes($length);
    fatal('input ended inside a frame') if length($body) < $length;
    my $req = eval { $json->decode($body) };
    fatal("undecodable frame: $@") if !defined $req;
    fatal('frame is not an object') if ref $req ne 'HASH';
    my $id = $req->{id};
    fatal('request without an integer id') if !defined $id || ref $id || "$id" !~ /\A-?[0-9]+\z/;
    my $command = $req->{command} // '';
    next if $command eq '$cancel';    # no cancel capability: nothing runs concurrently
    $handled++;
    my $handler = $commands{$command};
    if (!$handler) {
        my $supported = join(', ', sort keys %commands);
        write_frame({ id => 0 + $id, success => JSON::PP::false,
                      error => "unknown command '$command' (supported: $supported)" });
        next;
    }
    my $args = ref $req->{args} eq 'HASH' ? $req->{args} : {};
    my $result = eval { $handler->($args) };
    if (my $error = $@) {
        chomp $error;
        write_frame({ id => 0 + $id, success => JSON::PP::false, error => "$command: $error" });
    } else {
        write_frame({ id => 0 + $id, success => JSON::PP::true, result => $result });
    }
}
